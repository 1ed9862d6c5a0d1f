"""Where the metrics' pretrained networks come from (torch-free: download_models.py reads it).

The files are found, like torchvision and pytorch-fid find them, in torch hub's checkpoint folder
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``): ``python download_models.py --models lpips_alex
lpips_vgg fid_inception`` puts them there.
"""
from __future__ import annotations

# download_models name -> URL (the ImageNet backbones torchvision publishes; pytorch-fid's Inception)
METRIC_WEIGHTS = {
    "lpips_alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "lpips_vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "fid_inception": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth",
}
RANDOM_WEIGHTS_SEED = 0  # a network without weights is built from this seed: fixed numbers, named as random


def download_command(name: str) -> str:
    return f"python download_models.py --models {name}"
