"""LoRA / QLoRA on hf_accel's quantized layers: trains, saves, reloads, and merges only when asked to."""

import pytest
import torch

peft = pytest.importorskip("peft")

import hf_accel  # noqa: E402
from hf_accel.errors import AccelError  # noqa: E402
from hf_accel.plugins.quantization.lora import QuantLoraLinear, load_adapter, lora_config, merge_dequantized  # noqa: E402
from hf_accel.quality import load_reference  # noqa: E402
from hf_accel.quality.corpus import iter_texts  # noqa: E402


def batches(tokenizer, n: int, length: int = 64):
    text = "\n".join(t for _, t in zip(range(20), iter_texts("train")))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return [ids[i * length : (i + 1) * length][None] for i in range(n)]


@pytest.mark.parametrize("spec", ["int8", "int4(group_size=32)", "fp8"])
def test_qlora_trains_saves_reloads(spec, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_reference("tiny")
    hf_accel.apply(model, spec)
    packed_before = {n: p.clone() for n, p in model.named_parameters() if p.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)}
    config = lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, QuantLoraLinear)

    data = batches(tokenizer, 12)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)

    def loss_on(ids):
        return peft_model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        before = sum(loss_on(b).item() for b in data[:4])
    for _ in range(3):
        for b in data:
            opt.zero_grad()
            loss_on(b).backward()
            opt.step()
    with torch.no_grad():
        after = sum(loss_on(b).item() for b in data[:4])
    assert after < before * 0.97, (before, after)
    for n, p in peft_model.base_model.model.named_parameters():  # the packed weights never moved
        key = n.replace(".base_layer", "")
        if key in packed_before:
            assert torch.equal(p, packed_before[key])

    ids = data[0]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_reference("tiny")
    hf_accel.apply(fresh, spec)
    reloaded = load_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)

    with pytest.raises(AccelError, match="cannot merge a LoRA adapter"):
        reloaded.merge_adapter()
    merged = merge_dequantized(reloaded.base_model.model)
    assert not any(isinstance(m, QuantLoraLinear) for m in merged.modules())
    with torch.no_grad():
        rel = ((merged(input_ids=ids).logits - expected).norm() / expected.norm()).item()
    assert rel < 2e-2, rel  # exact merge in float; the only difference is dequantised vs fused kernel rounding
