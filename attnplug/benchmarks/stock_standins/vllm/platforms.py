import torch


class _Platform:
    def fp8_dtype(self):
        return torch.float8_e4m3fn

    def is_device_capability_family(self, family):
        major, minor = torch.cuda.get_device_capability()
        return major * 10 == family


current_platform = _Platform()
