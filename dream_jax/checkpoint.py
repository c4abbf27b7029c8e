"""Checkpoints through orbax: one step directory holds the train state, the data
iterator's state and the resolved config.

Orbax writes each step into a temporary directory and renames it only once all
of it is written, so a crash mid-save (even kill -9) leaves no checkpoint that
`latest_step` would pick up; the previous complete one stays the latest.
"""
import json
import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config) -> None:
        args = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        )
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(int(step), args=ocp.args.Composite(**args))

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores onto the shardings of `abstract_state` (so the mesh may differ from the saving run)."""
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(int(step), args=ocp.args.Composite(**args))["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
