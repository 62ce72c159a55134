"""quantize_ on tiny Hugging Face models of every supported family."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bitllm.errors import QuantizationError, UnsupportedModelError
from bitllm.nn import BinaryLinear, BitLinear, OneBitLinear
from bitllm.quant import config_for, pack_, quantize_, set_lambda_
from bitllm.quant.config import OneBitConfig, QuantConfig, TernaryConfig
from bitllm.tiny import FAMILIES, tiny_model

LAYER = {"ternary": BitLinear, "ternary-wo": BitLinear, "binary": BinaryLinear, "onebit": OneBitLinear}


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ternary", "ternary-wo", "binary", "onebit"])
def test_quantize_swaps_every_linear_but_lm_head(family, method):
    model = tiny_model(family)
    before = [n for n in _linears(model) if n != "lm_head"]
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        fp = model(ids).logits
    quantize_(model, config_for(method))
    swapped = [n for n, m in model.named_modules() if isinstance(m, LAYER[method])]
    assert sorted(swapped) == sorted(before) and len(swapped) > 0
    assert type(model.lm_head) is nn.Linear
    out = model(ids).logits
    assert out.shape == fp.shape and not torch.allclose(out, fp)
    out.float().pow(2).mean().backward()  # gradients reach the latent weights through the STE
    grads = [m.weight.grad for _, m in model.named_modules() if isinstance(m, LAYER[method])]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.bitllm_config.method.value == method


def test_skip_list_and_lambda_zero():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        fp = model(ids).logits
    quantize_(model, TernaryConfig(skip=("lm_head", "mlp.down_proj"), lam=0.0))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, BitLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fp)  # lam = 0 is the fp model
    set_lambda_(model, 1.0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, fp)
    with pytest.raises(ValueError):
        set_lambda_(model, 1.5)


def test_pack_keeps_the_forward():
    model = tiny_model("phi")
    quantize_(model, config_for("ternary"))
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
        pack_(model, "t1")
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_weights_are_transposed_correctly():
    model = tiny_model("gpt2")
    quantize_(model, config_for("ternary", lam=0.0))
    # with lam = 0 the BitLinear is exactly the Conv1D it replaced
    fresh = tiny_model("gpt2")
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits)


def test_errors():
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()), config_for("ternary"))
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="up_proj.weight"):
        quantize_(model, config_for("ternary"))


def test_configs_round_trip_json():
    import json

    for cfg in (TernaryConfig(input_norm=True, skip=("lm_head", "x")), OneBitConfig(svid=False), config_for("binary")):
        again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    with pytest.raises(Exception, match="unknown quantization method"):
        config_for("int3")


def test_quantize_twice_is_refused_and_a_nan_leaves_the_model_untouched():
    model = tiny_model("llama")
    quantize_(model, TernaryConfig(skip=("lm_head", "mlp.down_proj")))
    # a second call used to swap down_proj for BinaryLinear and record "binary" for a mostly ternary model
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_(model, config_for("binary"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear and model.bitllm_config.method.value == "ternary"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("inf")  # the last linear but lm_head
    with pytest.raises(QuantizationError, match="down_proj.weight"):
        quantize_(model, config_for("ternary"))
    assert not any(isinstance(m, BitLinear) for m in model.modules())  # nothing swapped before the error


def test_skip_pattern_that_matches_nothing_warns():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match=r"\['mlp.dwn_proj'\] match no module"):
        quantize_(model, TernaryConfig(skip=("lm_head", "mlp.dwn_proj")))
    assert isinstance(model.model.layers[0].mlp.down_proj, BitLinear)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patterns that match (and the default lm_head) stay quiet
        quantize_(tiny_model("llama"), TernaryConfig(skip=("lm_head", "*.layers.0.*", "up_proj")))
