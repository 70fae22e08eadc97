import pytest
import torch
from torch.testing import assert_close

from moekit import ModelConfig, Transformer
from moekit.model.cross_entropy import linear_cross_entropy, reference_linear_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_fused_equals_plain_loss_and_grads(reduction, chunk):
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (50,))
    y[[3, 10, 11]] = -100  # ignored
    results = []
    for fn in (lambda: linear_cross_entropy(h, w, y, chunk=chunk, reduction=reduction),
               lambda: reference_linear_cross_entropy(h, w, y, reduction=reduction)):
        h.grad = w.grad = None
        loss = fn()
        (2.5 * loss).backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert results[0][1][3].abs().sum() == 0  # ignored tokens get no gradient


def test_fused_under_bf16_autocast_is_close():
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(500, 32, requires_grad=True)
    y = torch.randint(0, 500, (64,))
    ref = reference_linear_cross_entropy(h, w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, atol=0.05 * ref.item(), rtol=0)
    loss.backward()
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype


@pytest.mark.parametrize("tie", [True, False])
def test_model_labels_path_equals_logits_path(tie):
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=300, dim=32, n_layers=2, tie_embeddings=tie)
    model = Transformer(cfg)
    ids = torch.randint(0, 300, (2, 9))
    labels = torch.randint(0, 300, (2, 9))
    labels[0, -2:] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    for a, p in zip(grads, model.parameters()):
        assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(ids, labels=labels[:, :3])
