"""Cross-check against an installed SAELens (not a dependency of this project).

    python -m venv /tmp/sl && /tmp/sl/bin/pip install torch==2.13.0 sae-lens==6.54.12 -r requirements.txt
    /tmp/sl/bin/python bench/check_saelens_compat.py

Our saved SAEs load in sae_lens.SAE.load_from_disk and give bit-identical codes and
reconstructions, and SAELens's own saves load here likewise. tests/test_sae.py checks
the same semantics against hand-written SAELens reference code everywhere else.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae import ARCHS, SAE  # noqa: E402
from tests.test_sae import data, make  # noqa: E402


def check_against_installed_saelens(tmp_path):
    """Only where sae_lens is installed (it is not a dependency; e.g. a throwaway venv with
    sae-lens==6.54.12): our files through SAELens's loader, and its saves through ours,
    give bit-identical codes and reconstructions. The hand-written reference tests above
    check the same semantics everywhere else."""
    import sae_lens
    from sae_lens.saes import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    x = data(300, 32)
    for arch in ARCHS:
        ours = make(arch)
        ours.eval()
        ours.save(tmp_path / arch)
        theirs = sae_lens.SAE.load_from_disk(tmp_path / arch)
        with torch.no_grad():
            assert torch.equal(ours.encode(x), theirs.encode(x)), arch
            assert torch.equal(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x))), arch
    for name, sl in {"standard": StandardSAE(StandardSAEConfig(d_in=32, d_sae=128)),
                     "topk": TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=6)),
                     "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=128, apply_b_dec_to_input=False))}.items():
        with torch.no_grad():
            for n, p in sl.named_parameters():
                p.copy_(0.3 * torch.randn_like(p) + (0.4 if n == "threshold" else 0.0))
        sl.save_model(tmp_path / f"sl_{name}")
        ours = SAE.load(tmp_path / f"sl_{name}")
        with torch.no_grad():
            assert torch.equal(ours.encode(x), sl.encode(x)), name
            assert torch.equal(ours.decode(ours.encode(x)), sl.decode(sl.encode(x))), name


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        check_against_installed_saelens(Path(d))
    print("SAELens round trip: identical codes and reconstructions for", ", ".join(ARCHS))
