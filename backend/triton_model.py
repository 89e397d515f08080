"""The Triton Python-backend model: ``model_repository/*/1/model.py`` re-exports :class:`TritonPythonModel`.

Deliberately light: Triton runs ``auto_complete_config`` in a stub process of its own before it starts each
instance's stub, so this module imports neither torch nor transformers; the served model
(:mod:`tritonmoe.backend.serving`) is imported in ``initialize``. That spares every model load one import of
torch and transformers (seconds of its cold start). ``serving`` itself is torch-free too: with the config parameter
``engine_pool`` the engine runs in a warm engine-pool worker and the instance's stub never imports torch at all;
without it ``serving`` imports the engine (torch, transformers) in ``initialize``, as before.
"""

from __future__ import annotations

from .io_spec import INPUTS, OUTPUTS


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        """Fill in the vLLM-compatible I/O so a model's config.pbtxt needs only its parameters."""
        current = config.as_dict()
        have_inputs = {i["name"] for i in current.get("input", [])}
        have_outputs = {o["name"] for o in current.get("output", [])}
        for spec in INPUTS:
            if spec["name"] not in have_inputs:
                config.add_input(spec)
        for spec in OUTPUTS:
            if spec["name"] not in have_outputs:
                config.add_output(spec)
        config.set_max_batch_size(0)
        config.set_model_transaction_policy({"decoupled": True})
        return config

    def initialize(self, args: dict) -> None:
        from .serving import ServedModel

        self._served = ServedModel()
        self._served.initialize(args)

    def execute(self, requests):
        return self._served.execute(requests)

    def finalize(self) -> None:
        self._served.finalize()
