"""A foreign ServerApp: asks every connected site to run the foreign ClientApp, writes what
came back (contents and error reasons) to the run config's ``out-file``."""

import json
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    out, want = str(context.run_config["out-file"]), int(context.run_config["sites"])
    nodes: list[int] = []
    for _ in range(120):  # at most 120 s for the sites to be connected
        nodes = list(grid.get_node_ids())
        if len(nodes) >= want:
            break
        time.sleep(1)
    msgs = [
        Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    replies = grid.send_and_receive(msgs, timeout=120)
    got = []
    for r in replies:
        if r.has_error():
            got.append({"error": r.error.reason, "code": r.error.code})
        else:
            got.append({"content": {k: dict(v) for k, v in r.content.items()}})
    with open(out, "w") as fh:
        json.dump({"nodes": len(nodes), "replies": got}, fh)
