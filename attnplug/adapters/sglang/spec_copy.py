"""``sglang.spec.metadata_copy``: the multi-step draft backends' metadata copies (SGLang PR 17554).

Not ported, on purpose. SGLang 0.5.9 and later already copy the precomputed NSA/DSA draft
metadata into the steps' CUDA-graph buffers with their own fused kernels (one launch per draft
backend; with more than 3 steps one launch covers backends 0-2: ``fused_metadata_copy_multi_cuda``),
and the FlashAttention / Triton multi-step backends make no such copies (FlashAttention recomputes per step, with lengths that differ per step; Triton shares
one buffer). The releases with per-tensor copies (0.5.7 to 0.5.8.post1,
``NativeSparseAttnMultiStepBackend.init_forward_metadata_replay_cuda_graph``) are not tested here,
and attnplug's ``fused_metadata_copy`` is not measured against SGLang's fused copy, so the patch
refuses to apply rather than run untested code.
"""


def fused_draft_metadata_copy(original):
    raise LookupError(
        f"attnplug has no tested replacement of {original.__qualname__} for this release (SGLang 0.5.7-0.5.8.post1 "
        "copy draft metadata per tensor; none of attnplug's tested releases does)"
    )
