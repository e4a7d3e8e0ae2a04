"""TEST-ONLY: the ``sgl_kernel.kvcacheio`` names SGLang 0.5.9's ``memory_pool_host`` imports; calling them raises."""

from sgl_kernel import STAND_IN, _unavailable

_NAMES = (
    "transfer_kv_all_layer", "transfer_kv_all_layer_direct_lf_pf", "transfer_kv_all_layer_lf_pf",
    "transfer_kv_all_layer_lf_ph", "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf",
    "transfer_kv_direct", "transfer_kv_per_layer", "transfer_kv_per_layer_direct_pf_lf", "transfer_kv_per_layer_mla",
    "transfer_kv_per_layer_mla_pf_lf", "transfer_kv_per_layer_pf_lf", "transfer_kv_per_layer_ph_lf",
)  # fmt: skip
globals().update({name: _unavailable(f"kvcacheio.{name}") for name in _NAMES})


def __getattr__(name: str):
    raise AttributeError(f"sgl_kernel.kvcacheio.{name} is not provided by {STAND_IN}")
