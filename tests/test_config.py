"""AccelConfig: every spelling of a spec normalises to one canonical, serialisable form; bad input is explained."""

import json

import pytest

from hf_accel import AccelConfig
from hf_accel.errors import AccelError, ConflictError, OptionError, UnknownPluginError

from plugin_doubles import ScaleLogits


pytestmark = pytest.mark.usefixtures("plugin_doubles")


def test_all_spellings_normalise_to_one_form():
    forms = [
        "scale_logits(factor=3)+int8",
        "int8 + scale_logits(factor=3.0)",
        {"int8": {}, "scale_logits": {"factor": 3}},
        ["int8", {"name": "scale_logits", "options": {"factor": 3}}],
        [ScaleLogits(factor=3.0), "int8"],
        {"format_version": 1, "plugins": [{"name": "scale_logits", "options": {"factor": 3}}, {"name": "int8"}]},
    ]
    configs = [AccelConfig.from_spec(f) for f in forms]
    assert all(c == configs[0] for c in configs)
    c = configs[0]
    assert c.names == ["int8", "scale_logits"]  # weights before runtime, whatever the spelling order
    assert c.to_string() == "int8(skip=[lm_head], outliers=0.0, calibration_tokens=32768, calibration_seq_len=512, method=rtn)+scale_logits(factor=3.0, mode=mul)"
    data = json.loads(json.dumps(c.to_dict()))
    assert AccelConfig.from_dict(data) == c
    assert AccelConfig.from_spec(c.to_string()) == c


def test_unknown_plugin_suggests_close_names_and_lists_installed():
    with pytest.raises(UnknownPluginError) as e:
        AccelConfig.from_spec("int9")
    msg = str(e.value)
    assert "'int9'" in msg and "Did you mean 'int8'" in msg and "Installed plugins:" in msg and "scale_logits" in msg


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("scale_logits(factr=2)", "has no option 'factr'; accepted options: factor (float, default 2.0), mode ('mul' | 'add', default 'mul')"),
        ("scale_logits(factor=abc)", "option 'factor' expects float, got 'abc'"),
        ("scale_logits(factor=true)", "option 'factor' expects float, got True"),
        ("scale_logits(mode=div)", "option 'mode' expects 'mul' | 'add', got 'div'"),
        ("scale_logits(factor=-1)", "factor must be > 0"),
        ("int8(skip=3)", "option 'skip' expects list of str, got 3"),
        ("otherquant(bits=4.5)", "option 'bits' expects int, got 4.5"),
    ],
)
def test_bad_options_say_what_is_accepted(spec, needle):
    with pytest.raises(OptionError) as e:
        AccelConfig.from_spec(spec)
    assert needle in str(e.value)


def test_conflicts_and_duplicates():
    with pytest.raises(ConflictError, match="'int8' and 'otherquant' cannot be combined"):
        AccelConfig.from_spec("int8+otherquant")
    with pytest.raises(ConflictError, match="appears twice"):
        AccelConfig.from_spec("int8+int8")


def test_non_spec_types_are_refused():
    with pytest.raises(AccelError, match="must be a string, dict, list or AccelConfig"):
        AccelConfig.from_spec(42)
    with pytest.raises(AccelError, match="format_version 9"):
        AccelConfig.from_spec({"format_version": 9, "plugins": []})
