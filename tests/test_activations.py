"""lib/activations.py: one way to open activations, one held-out rule per kind, one chunked encode."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import sparse_dictionary_data, write_acts
from lib import activations as A
from lib.common import UserError
from sae import SAE


def test_bare_file_holds_out_a_seeded_tenth(tmp_path):
    x = sparse_dictionary_data(n=1000, d=16, active=2)[0]
    save_file({"activations": x}, str(tmp_path / "bare.safetensors"))
    a0, a0b, a1 = (A.open_acts(tmp_path / "bare.safetensors", s) for s in (0, 0, 1))
    assert a0.kind == "file" and a0.n_rows == 1000 and a0.n_train == 900 and "seeded 10%" in a0.split
    assert torch.equal(a0.train, a0b.train) and not torch.equal(a0.train, a1.train)
    assert torch.equal(~a0.train, A.heldout_mask(1000, 0)) and int(A.heldout_mask(1000, 0).sum()) == 100
    assert torch.equal(a0.heldout_rows(), x[A.heldout_mask(1000, 0)])        # in file order
    assert torch.equal(a0.heldout_rows(7), x[A.heldout_mask(1000, 0)][:7])
    assert torch.equal(a0.train_rows(), x[~A.heldout_mask(1000, 0)])
    assert torch.equal(a0.sample_rows(5000), x)                              # all of it when it fits
    assert len(a0.sample_rows(10)) == 10


def test_file_with_train_mask_and_labels(tmp_path):
    x = torch.randn(40, 8)
    path = write_acts(tmp_path / "activations.safetensors", x, train_frac=0.75,
                      extra={"a": torch.arange(40), "b": torch.arange(40) % 3, "c": torch.zeros(40, dtype=torch.long)})
    acts = A.open_acts(tmp_path)                                             # the directory holding it
    assert acts.path == path and acts.split == "train_mask" and acts.n_train == 30
    assert torch.equal(acts.heldout_rows(), x[30:]) and set(acts.labels) == {"a", "b", "c"}
    with pytest.raises(UserError, match="width 8, but d_in of the SAE is 9"):
        A.check_width(acts, 9)


def test_encode_chunks_equal_one_encode_and_restore_the_mode():
    sae = SAE(16, 64, "batchtopk", k=3, generator=torch.Generator().manual_seed(0))
    sae.threshold.fill_(0.1)
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(1))
    sae.train()
    codes, recon = A.encode_all(sae, x, chunk=128)
    assert sae.training                                                       # mode restored
    sae.eval()
    with torch.no_grad():
        assert torch.equal(codes, sae.encode(x)) and torch.allclose(recon, sae.decode(sae.encode(x)), atol=1e-6)
    assert sum(len(f) for _, f, _ in A.encode_chunks(sae, x, chunk=300)) == 1000


def test_lm_context_rule_is_a_seeded_fraction():
    idx = torch.arange(20000)
    h = A.is_heldout_context(idx, 0.05, 0)
    assert abs(float(h.float().mean()) - 0.05) < 0.01
    assert torch.equal(h, A.is_heldout_context(idx, 0.05, 0)) and not torch.equal(h, A.is_heldout_context(idx, 0.05, 1))
    assert not A.is_heldout_context(idx, 0.0, 0).any()
