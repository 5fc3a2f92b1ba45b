"""The SAELens half of tests/test_interop.py, run by it with .venv-saelens/bin/python (the
separate environment that tests/setup_saelens_env.sh builds with the real sae-lens). It
never imports this project's code: the two sides meet only through files.

    python tests/saelens_side.py WORK THREADS

Reads
    WORK/x.safetensors          x [n, d_in], the inputs
    WORK/ours/NAME/             SAEs saved by our sae.py (cfg.json + sae_weights.safetensors)
Writes
    WORK/theirs_on_ours/NAME.safetensors   codes, recon: sae_lens.SAE.load_from_disk(WORK/ours/NAME)
    WORK/sl/NAME/                          SAEs made and saved by SAELens itself
    WORK/sl_out/NAME.safetensors           codes, recon: SAELens's own SAE on x
    WORK/report.json                       versions, and what SAELens made of each of our files
THREADS: torch's thread count, the same as the other side's, so that both sides run the
same matmul kernels and bit-for-bit comparisons are fair.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sae_lens
from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
                           StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig)

D_IN, D_SAE, K = 32, 128, 6


def codes_and_recon(sae, x):
    sae.eval()
    with torch.no_grad():
        f = sae.encode(x)
        return {"codes": f.contiguous(), "recon": sae.decode(f).contiguous()}


def randomise(sae, seed, threshold=1.0, dec_norms=False):
    """Generic weights (SAELens's inits are structured: W_enc = W_dec^T, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (threshold if name == "threshold" else 0.0))
        if dec_norms:           # rows far from unit norm: what rescale_acts_by_decoder_norm is about
            sae.W_dec.mul_(0.5 + 1.5 * torch.rand(sae.W_dec.shape[0], 1, generator=g))
    return sae


def main(work: Path, threads: int):
    torch.set_num_threads(threads)
    x = load_file(str(work / "x.safetensors"))["x"]
    report = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "ours": {}}

    # 1. our files through SAELens's own loader
    (work / "theirs_on_ours").mkdir(exist_ok=True)
    for d in sorted(p for p in (work / "ours").iterdir() if p.is_dir()):
        sae = sae_lens.SAE.load_from_disk(d)
        meta = sae.cfg.metadata
        report["ours"][d.name] = {
            "class": type(sae).__name__, "architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae, "k": getattr(sae.cfg, "k", None),
            "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
            "normalize_activations": sae.cfg.normalize_activations,
            "model_name": getattr(meta, "model_name", None), "hook_name": getattr(meta, "hook_name", None),
            "distinct_thresholds": int(sae.threshold.unique().numel()) if hasattr(sae, "threshold") else None}
        save_file(codes_and_recon(sae, x), str(work / "theirs_on_ours" / f"{d.name}.safetensors"))

    # 2. SAELens's own saves (save_model; BatchTopK also as its JumpReLU inference export)
    made = {
        "standard": randomise(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)), 1),
        "topk": randomise(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)), 2),
        "topk_rescaled": randomise(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K,
                                                         rescale_acts_by_decoder_norm=True)), 3, dec_norms=True),
        "jumprelu": randomise(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)), 4),
    }
    (work / "sl_out").mkdir(exist_ok=True)
    for name, sae in made.items():
        sae.save_model(work / "sl" / name)
        save_file(codes_and_recon(sae, x), str(work / "sl_out" / f"{name}.safetensors"))
    btk = randomise(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)), 5, dec_norms=True)
    btk.topk_threshold = torch.tensor(3.0, dtype=torch.double)
    btk.save_model(work / "sl" / "batchtopk_training")           # architecture "batchtopk", topk_threshold
    btk.save_inference_model(work / "sl" / "batchtopk")          # SAELens's export: a JumpReLU
    inference = sae_lens.SAE.load_from_disk(work / "sl" / "batchtopk")
    report["batchtopk_inference_class"] = type(inference).__name__
    save_file(codes_and_recon(inference, x), str(work / "sl_out" / "batchtopk.safetensors"))

    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"sae-lens {sae_lens.__version__}: {len(report['ours'])} of our SAEs read, {len(made) + 1} written")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
