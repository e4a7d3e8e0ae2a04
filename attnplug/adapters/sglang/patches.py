"""Patches of SGLang's own attention backends, declared as data (see attnplug.adapters.patching.Patch).

Tested releases: 0.5.8.post1 (the last with per-tensor NSA draft-metadata copies), 0.5.9 (the last
before SGLang PR 20778 fused the decode metadata), 0.5.10.post1 (the 0.5.10 line: no FA3
scheduler-metadata precompute, added in 0.5.11) and 0.5.23.
Each patch declares only the releases where it has something to add; elsewhere it is skipped
with the reason (and the support matrix says "upstream already has it" or "not applicable").
"""

from attnplug.adapters.patching import Patch, Rebinding

_FA = "sglang.srt.layers.attention.flashattention_backend"
_NSA = "sglang.srt.layers.attention.nsa_backend"
_TRITON = "sglang.srt.layers.attention.triton_backend"
_DRAFT_UTILS = "sglang.srt.speculative.draft_utils"
_REPLACEMENTS = "attnplug.adapters.sglang"

NORMAL_DECODE_SET_METADATA_SIGNATURE = (
    "cache_seqlens_int32", "cu_seqlens_k", "page_table", "req_to_token", "req_pool_indices", "strided_indices",
    "max_seq_pages", "seq_lens", "seq_len_delta", "page_size", "swa_page_table", "token_to_kv_pool",
)  # fmt: skip

# Applied by the backend's registration (needed for --attention-backend attnplug with speculative decoding);
# it acts only when SGLang resolves the draft backend name to "attnplug".
DRAFT_BACKENDS = Patch(
    id="sglang.attnplug.draft_backends",
    engine="sglang",
    rebinds=(
        Rebinding(
            targets=(f"{_DRAFT_UTILS}:DraftBackendFactory._create_backend",),
            replacement=f"{_REPLACEMENTS}.draft_backends:draft_backend_factory",
            signature=("self", "backend_name", "backend_map", "error_template", "stamps_children"),
        ),
    ),
    versions="==0.5.23",
    upstream="none (SGLang has no registry for draft backends)",
    why=(
        "SGLang builds the draft-decode and draft-extend backends of EAGLE / STANDALONE speculative decoding from "
        "fixed name tables (DraftBackendFactory), so --attention-backend attnplug with --speculative-algorithm "
        "failed there. The patch adds attnplug's multi-step draft backend (one fused_decode_metadata launch for all "
        "draft steps of a round) and its draft-extend backend to those tables; other backend names are untouched."
    ),
    remove_when="SGLang offers a registry for draft attention backends.",
)

PATCHES: list[Patch] = [
    DRAFT_BACKENDS,
    Patch(
        id="sglang.fa.decode_metadata",
        engine="sglang",
        rebinds=(
            Rebinding(
                targets=(f"{_FA}:normal_decode_set_metadata",),  # no other module imports it in 0.5.8-0.5.9
                replacement=f"{_REPLACEMENTS}.fa_metadata:fused_normal_decode_set_metadata",
                signature=NORMAL_DECODE_SET_METADATA_SIGNATURE,
            ),
            Rebinding(
                targets=(f"{_FA}:FlashAttentionBackend.init_forward_metadata",),
                replacement=f"{_REPLACEMENTS}.fa_metadata:fused_decode_init_forward_metadata",
                signature=("self", "forward_batch"),
            ),
        ),
        versions=">=0.5.8,<0.5.10",
        upstream="SGLang PR 20778 (fused decode metadata, first released in 0.5.10)",
        upstream_has_it=">=0.5.10",
        why=(
            "SGLang 0.5.8-0.5.9 build each decode step's cache_seqlens / cu_seqlens_k / page table (and SWA page "
            "table) with ~6-10 small torch ops, on the CUDA-graph replay path (normal_decode_set_metadata) and inline "
            "on the eager path; attnplug writes the same values with one fused_decode_metadata launch. Not applied to "
            "0.5.10+: upstream fused it (0.5.19+ also writes only each live prefix and takes page mappings, a "
            "different contract)."
        ),
        remove_when="the oldest supported SGLang release is 0.5.10 or newer.",
    ),
    Patch(
        id="sglang.fa.scheduler_metadata",
        engine="sglang",
        rebinds=(
            Rebinding(
                targets=(f"{_FA}:FlashAttentionBackend.__init__",),
                replacement=f"{_REPLACEMENTS}.fa_scheduler:precomputed_scheduler_metadata_init",
                signature=("self", "model_runner", "skip_prefill", "speculative_step_id", "topk",
                           "speculative_num_steps", "fa_impl_ver"),
            ),
        ),
        versions="==0.5.10.*",
        upstream="SGLang PR 21104 with the sgl-kernel op of PR 21103 (superseding PR 20943), released in 0.5.11",
        upstream_has_it=">=0.5.11",
        why=(
            "FA3 runs its prepare kernel in every layer unless scheduler_metadata is computed once per batch. "
            "SGLang 0.5.10 never computes it, though its sglang-kernel 0.4.1 has get_scheduler_metadata; attnplug "
            "computes it once per normal-decode batch (eager, and into a persistent buffer refreshed at each "
            "CUDA-graph replay) and passes it to the default decode call, as 0.5.11 does. Each backend built while "
            "the patch is applied gets these steps on its own methods (its CUDA graphs depend on them). The "
            "sgl-kernel 0.3.21 of 0.5.8-0.5.9 has no get_scheduler_metadata, so nothing can compute it there."
        ),
        remove_when="0.5.10 is no longer supported.",
    ),
    Patch(
        id="sglang.spec.metadata_copy",
        engine="sglang",
        rebinds=(
            Rebinding(
                targets=(f"{_NSA}:NativeSparseAttnMultiStepBackend.init_forward_metadata_replay_cuda_graph",),
                replacement=f"{_REPLACEMENTS}.spec_copy:fused_draft_metadata_copy",
                signature=("self", "forward_batch", "bs"),
            ),
        ),
        versions=">=0.5.8,<0.5.9",
        upstream="SGLang PR 17554 (fused multi-backend metadata copy, released in 0.5.9)",
        upstream_has_it=">=0.5.9",
        why=(
            "The NSA/DSA multi-step draft backend copies one precomputed batch metadata into each draft step's "
            "CUDA-graph buffers, 5-8 copy_ launches per step in 0.5.8 / 0.5.8.post1; attnplug keeps SGLang's copies "
            "for step 0 and fills steps 1..T-1 from step 0's buffers with one fused_metadata_copy launch. 0.5.9+ fuse "
            "it themselves; the FlashAttention and Triton multi-step backends make no such copies. 0.5.7 switches "
            "the precompute with a module constant instead of SGLang's envs and is not covered."
        ),
        remove_when="0.5.8 is no longer supported.",
    ),
    Patch(
        id="sglang.triton.kv_splits",
        engine="sglang",
        rebinds=(
            Rebinding(
                targets=(f"{_TRITON}:TritonAttnBackend.get_num_kv_splits",),
                replacement=f"{_REPLACEMENTS}.triton_splits:planned_get_num_kv_splits",
                signature=("self", "num_kv_splits", "seq_lens", "uneven_batch"),
            ),
        ),
        versions="==0.5.23",
        upstream="none (SGLang's own heuristic, get_num_kv_splits_triton)",
        why=(
            "The Triton backend launches a heuristic kernel every decode step to size its split-KV decode; attnplug "
            "plans the split once per batch size with its split-KV policy (pluggable through the attnplug_split_kv "
            "hook) and fills it with one fill_. 0.5.9 has the same heuristic under another signature "
            "(no uneven_batch), which this declaration does not cover."
        ),
        remove_when="SGLang sizes its decode split with an equivalent plan.",
        opt_in=(
            "measured slower than SGLang 0.5.23's own heuristic on the H200 (benchmarks/RESULTS.md, 2026-12-01: "
            "geomean 0.88x per decode call; 0.42-0.56x on batches of mixed lengths at 32k, up to 1.10x on uniform "
            "ones; the H100 showed the same, 0.93x), so it stays "
            "off unless named: the policy plans one split count for the batch and for attnplug's grid, not "
            "SGLang's per-request counts over its own grid."
        ),
    ),
]
