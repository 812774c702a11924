"""chromalab.config: params.yaml's groups are strict; every mistake is a one-line error naming its key."""

from __future__ import annotations

import pytest

from chromalab.config import Params, ParamsError, parse_params

GROUPS = tuple(Params.model_fields)


@pytest.mark.parametrize("group", GROUPS)
def test_an_unknown_key_in_any_group_is_an_error_naming_it(group):
    with pytest.raises(ParamsError, match=rf"^params\.yaml: {group}\.epochz: unknown key \(check the spelling"):
        parse_params({group: {"epochz": 3}})


@pytest.mark.parametrize(("raw", "key"), [
    ({"gan": {"epochs": "10"}}, "gan.epochs"),  # quoted in YAML: a string, not silently a number
    ({"base": {"seed": 7.0}}, "base.seed"),  # a float where an integer belongs
    ({"tfrecords": {"contrast_variants": "yes"}}, "tfrecords.contrast_variants"),
    ({"train": {"flip_lr": 1}}, "train.flip_lr"),
    ({"split": {"include_keywords": "person"}}, "split.include_keywords"),  # a word, not a list of them
    ({"data": {"source": "web"}}, "data.source"),
    ({"gan": {"norm": "layer"}}, "gan.norm"),
])
def test_a_value_of_the_wrong_type_or_choice_is_an_error_naming_its_key(raw, key):
    with pytest.raises(ParamsError, match=rf"^params\.yaml: {key}: ") as err:
        parse_params(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("raw", "key"), [
    ({"base": {"image_size": 16}}, "base.image_size"),  # a power of two, but the PatchGAN needs 32
    ({"split": {"min_confidence": 101}}, "split.min_confidence"),  # a tagger's confidence is 0-100
    ({"gan": {"chroma_expand": 1.5}}, "gan.chroma_expand"),
    ({"baseline": {"decay_epochs": -1}}, "baseline.decay_epochs"),
    ({"baseline": {"epochs": 10, "decay_epochs": 11}}, "baseline"),
    ({"gan": {"epochs": 5, "pretrain_epochs": 3, "warmup_epochs": 2}}, "gan"),  # no adversarial epoch left
])
def test_a_value_out_of_its_range_is_an_error(raw, key):
    with pytest.raises(ParamsError, match=rf"^params\.yaml: {key}: "):
        parse_params(raw)


def test_values_at_the_edges_of_their_ranges_and_ints_for_floats_are_accepted():
    params = parse_params({"base": {"image_size": 32}, "split": {"min_confidence": 100},
                           "baseline": {"epochs": 10, "decay_epochs": 10},
                           "gan": {"epochs": 5, "pretrain_epochs": 3, "warmup_epochs": 1, "learning_rate": 1}})
    assert params.base.image_size == 32 and params.baseline.n_decay_epochs == 10
    assert params.gan.learning_rate == 1.0 and isinstance(params.gan.learning_rate, float)
    assert parse_params({"gan": {"epochs": 9}}).gan.n_decay_epochs == 4  # "half", pix2pix's default
