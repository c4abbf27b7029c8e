"""Checkpoints through orbax: one step directory holds the train state, the data
iterator's state and the resolved config.

Orbax writes each step into a temporary directory and renames it only once all
of it is written, so a crash mid-save (even kill -9) leaves no checkpoint that
`latest_step` would pick up; the previous complete one stays the latest.
"""
import glob
import json
import os

import grain
import jax
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
        """Restores onto the shardings of `abstract_state` (so the mesh may differ from the saving run).

        The data position is per process. When the process count changed since the
        save, the saved positions are carried over only if all processes agree (true
        for the block-sliced synthetic pipeline, where each process is at global batch
        `step`); otherwise that is an error, since no exact resume exists.
        """
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        same_layout = data_iterator is not None and os.path.exists(self._data_file(step))
        if same_layout:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        state = self.manager.restore(int(step), args=ocp.args.Composite(**args))["state"]
        if data_iterator is not None and not same_layout:
            data_iterator.set_state(self._common_data_state(step))
        return state

    def _data_file(self, step):
        return os.path.join(self.directory, str(int(step)), "data",
                            f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def _common_data_state(self, step):
        files = sorted(glob.glob(os.path.join(self.directory, str(int(step)), "data", "process_*-of-*.json")))
        states = []
        for name in files:
            with open(name) as f:
                states.append(json.load(f))
        if not states or any(s != states[0] for s in states):
            raise ValueError(
                f"checkpoint step {step} in {self.directory} was written by {len(states)} processes whose "
                f"data positions differ; it cannot resume exactly with {jax.process_count()} processes")
        return states[0]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
