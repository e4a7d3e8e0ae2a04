import torch


def is_hip() -> bool:
    return torch.version.hip is not None


def is_gfx95_supported() -> bool:
    return False  # AMD only


def is_gfx1250_supported() -> bool:
    return False  # AMD only


def get_device_core_count(device_id: int = 0) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_id).multi_processor_count
    return 0
