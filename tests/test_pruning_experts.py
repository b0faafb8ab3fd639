"""prune_experts: MoE expert pruning on transformers' Qwen2-MoE and Mixtral classes (built from configs)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import hf_accel
from hf_accel.errors import AccelError, OptionError, UnsupportedModelError
from hf_accel.plugins.pruning.experts import expert_scores, moe_blocks
from hf_accel.plugins.pruning import calibration as cal
from hf_accel.plugins.pruning.structured import save_plain

from conftest import build, sample_ids

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = {
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=32,
                                                            shared_expert_intermediate_size=64)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=8)),
}
SPEC = "prune_experts(ratio=0.5, samples=4, seq_len=64, tokenizer=reference/tiny)"


@pytest.mark.parametrize("arch", sorted(MOE))
def test_experts_drop_config_shrinks_and_reloads(tmp_path, arch):
    torch.manual_seed(0)
    model = MOE[arch]().eval()
    hf_accel.apply(model, SPEC)
    key = "num_experts" if arch == "qwen2_moe" else "num_local_experts"
    assert getattr(model.config, key) == 4
    for _, block in moe_blocks(model):
        assert block.experts.gate_up_proj.shape[0] == block.gate.weight.shape[0] == 4
    ids = sample_ids(2, 12)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.isfinite().all()
    save_plain(model, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert getattr(again.config, key) == 4 and hf_accel.get_config(again).names == []
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_dead_expert_is_dropped_first():
    torch.manual_seed(0)
    model = MOE["qwen2_moe"]().eval()
    for _, block in moe_blocks(model):
        block.experts.down_proj.data[3] = 0  # contributes nothing
    ids = cal.calibration_ids(model, cal.load_tokenizer(model, "reference/tiny"), 4, 64)
    scores = expert_scores(model, ids)
    assert all(s[3] == 0 and (s[torch.arange(8) != 3] > 0).sum() >= 5 for s in scores)


def test_rollback_and_errors():
    torch.manual_seed(0)
    model = MOE["mixtral"]().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OptionError, match="num_experts_per_tok"):
        hf_accel.apply(model, "prune_experts(ratio=0.9, tokenizer=reference/tiny)")
    with pytest.raises(AccelError):
        hf_accel.apply(model, "prune_experts(tokenizer=does/not/exist)")
    after = model.state_dict()
    assert model.config.num_local_experts == 8 and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        hf_accel.apply(build("llama"), "prune_experts")
