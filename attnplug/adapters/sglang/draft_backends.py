"""Replacement for the patch ``sglang.attnplug.draft_backends``: the ``attnplug`` backend in SGLang's draft set-up.

SGLang 0.5.23 builds the draft-decode (multi-step) and draft-extend backends of EAGLE-style
speculative decoding in ``DraftBackendFactory``, from fixed tables of backend names local to
``create_decode_backend`` / ``create_draft_extend_backend``; any other name raises ``EAGLE is not
supported in ... backend attnplug``. Both pass their table to ``_create_backend``, which this wraps
to add ``attnplug`` to it, so SGLang's own name resolution (``--speculative-draft-attention-backend``,
``speculative_attention_mode``), its label stamping and its rules (no multi-step backend for one
step) stay as they are. Registered with the backend: it only acts when the resolved name is ours.
"""

from __future__ import annotations

import functools

from attnplug.adapters.sglang.registration import BACKEND_NAME


def draft_backend_factory(original):
    """``DraftBackendFactory._create_backend`` with ``attnplug`` in every backend table."""

    @functools.wraps(original)
    def _create_backend(self, backend_name, backend_map, error_template, stamps_children=False):
        from attnplug.adapters.sglang.backend import AttnplugAttnBackend, AttnplugMultiStepDraftBackend

        runner = self.draft_model_runner

        def multi_step():
            return BACKEND_NAME, AttnplugMultiStepDraftBackend(runner, self.topk, self.speculative_num_steps)

        def draft_extend():  # the draft runner built ours through the registry already: reuse it
            existing = getattr(runner, "attn_backend", None)
            return BACKEND_NAME, existing if isinstance(existing, AttnplugAttnBackend) else AttnplugAttnBackend(runner)

        tables = {**backend_map, BACKEND_NAME: multi_step if stamps_children else draft_extend}
        return original(self, backend_name, tables, error_template, stamps_children)

    return _create_backend
