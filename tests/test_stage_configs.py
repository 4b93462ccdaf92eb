"""One config path for encode and export-tokens, as for fit: each stage's settings are the fields of
one config (`EncodeConfig`, `ExportConfig`), the CLI's options are made from those fields, every
setting reaches the stage from the command line and from Python, a config object is taken as it is
or under keywords, and a bad name or value is refused in one line naming the parameter."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import revq_pipe.stages.encode as encode_stage
import revq_pipe.stages.export_tokens as export_stage
from revq_pipe.cli import app
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.images.encode_config import EncodeConfig
from revq_pipe.pipeline.model.config import ReVQConfig, settings_of
from revq_pipe.pipeline.model.revq import ReVQ
from revq_pipe.pipeline.storage.export_formats import ExportConfig
from revq_pipe.pipeline.storage.store import LatentStore
from test_encode import SMALL
from test_export_decode import VAE_ID, latent_store

# setting -> (its words on the command line, the value its field must then hold: not the default)
ENCODE_FLAGS = {
    "image_size": (["--image-size", "32"], 32),
    "batch_size": (["--batch-size", "8"], 8),
    "device": (["--device", "cpu"], "cpu"),
    "dtype": (["--dtype", "float32"], "float32"),
    "workers": (["--workers", "0"], 0),
    "overwrite": (["--overwrite"], True),
    "flip": (["--flip"], True),
    "follow_links": (["--follow-links"], True),
    "decode_on": (["--decode-on", "device"], "device"),
    "compile_encoder": (["--compile"], True),
    "chunk_size": (["--chunk-size", "16"], 16),
}
EXPORT_FLAGS = {
    "batch_size": (["--batch-size", "7"], 7),
    "device": (["--device", "cpu"], "cpu"),
    "format": (["--format", "wds"], "wds"),
    "shard_size": (["--shard-size", "12"], 12),
    "shuffle": (["--shuffle"], True),
    "seed": (["--seed", "3"], 3),
    "overwrite": (["--overwrite"], True),
}
# Fields that are no CLI option: how a Python caller's run shows itself (the CLI always shows its bars).
PYTHON_ONLY = {"progress"}
STAGES = {"encode": (EncodeConfig, ENCODE_FLAGS), "export-tokens": (ExportConfig, EXPORT_FLAGS)}


@pytest.fixture
def inputs(tmp_path, photo_folder) -> dict[str, list[str]]:
    """Each command's arguments up to its settings; what export-tokens reads is never opened (the
    stage is replaced), but the checks before it want a run folder and a store folder."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / name).write_text("{}")
    (tmp_path / "store").mkdir()
    return {"encode": [str(photo_folder), "--out", str(tmp_path / "s.zarr")],
            "export-tokens": [str(run), str(tmp_path / "store"), "--out", str(tmp_path / "t")]}


def recorder(seen: list):
    """A stand-in for a stage function or check that records the config it is given and stops there."""

    def record(*args, config, **options):
        seen.append(config)
        raise UserError("recorded")

    return record


@pytest.fixture
def configs_given(monkeypatch) -> list:
    """The config each command hands its stage (which is not run: the options are under test)."""
    seen = []
    monkeypatch.setattr(encode_stage, "encode", recorder(seen))
    monkeypatch.setattr(export_stage, "export_tokens", recorder(seen))
    return seen


def command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_field_is_a_setting_with_a_test_or_python_only(stage):
    config_class, flags = STAGES[stage]
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert set(settings_of(config_class)) == set(flags) == fields - PYTHON_ONLY


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_options_are_made_from_the_config_fields(stage):
    config_class, _ = STAGES[stage]
    params = {param.name: param for param in command(stage).params}
    defaults = config_class()
    for name, setting in settings_of(config_class).items():
        param = params[name]
        assert param.opts == [setting.option] and param.help == setting.help, name
        # the option's default is the field's: a command and a Python call with nothing set agree
        assert param.default == getattr(defaults, name), name
        if not setting.flag:
            assert param.metavar == (setting.metavar or "|".join(setting.choices)), name
    assert not PYTHON_ONLY & params.keys()


@pytest.mark.parametrize("stage,name", [(stage, name) for stage, (_, flags) in sorted(STAGES.items())
                                        for name in sorted(flags)])
def test_each_option_reaches_its_field(stage, name, inputs, configs_given):
    config_class, flags = STAGES[stage]
    words, expected = flags[name]
    result = CliRunner().invoke(app, [stage, *inputs[stage], *words])
    assert result.exit_code == 2 and "recorded" in result.output, result.output
    assert getattr(config_class(), name) != expected
    assert configs_given[-1] == dataclasses.replace(config_class(), **{name: expected})


def test_nothing_given_is_the_configs_defaults(inputs, configs_given):
    for stage, (config_class, _) in STAGES.items():
        CliRunner().invoke(app, [stage, *inputs[stage]])
        assert configs_given[-1] == config_class()


def test_each_keyword_reaches_its_field_from_python(monkeypatch):
    seen = []
    monkeypatch.setattr(encode_stage, "check_encode", recorder(seen))  # the first thing given the config
    monkeypatch.setattr(export_stage, "check_export_tokens", recorder(seen))
    calls = {"encode": lambda **options: encode_stage.encode("photos", "s.zarr", **options),
             "export-tokens": lambda **options: export_stage.export_tokens("run", "store", "t", **options)}
    for stage, (config_class, flags) in STAGES.items():
        for name, (_, value) in {**flags, "progress": ([], False)}.items():
            with pytest.raises(UserError, match="recorded"):
                calls[stage](**{name: value})
            assert getattr(seen[-1], name) == value != getattr(config_class(), name), (stage, name)


def test_a_config_object_is_taken_and_keywords_set_fields_over_it():
    config = EncodeConfig(batch_size=8, flip=True)
    assert EncodeConfig.given(config) == config
    assert EncodeConfig.given(config, dtype="float32") == EncodeConfig(batch_size=8, flip=True, dtype="float32")
    assert ExportConfig.given(ExportConfig(format="wds"), seed=4) == ExportConfig(format="wds", seed=4)
    with pytest.raises(UserError, match="`config` must be a EncodeConfig, not ExportConfig"):
        EncodeConfig.given(ExportConfig())


def test_an_unknown_keyword_is_refused_in_one_line_naming_it(tmp_path):
    with pytest.raises(UserError) as refused:
        encode_stage.encode("photos", str(tmp_path / "s.zarr"), batch_sise=8)
    assert str(refused.value).startswith("unknown encode setting 'batch_sise': choose from image_size, batch_size,")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="unknown export_tokens setting 'shards': choose from batch_size"):
        export_stage.export_tokens("run", "store", str(tmp_path / "t"), shards=3)


@pytest.mark.parametrize("make,said", [
    (lambda: EncodeConfig(batch_size=0), "`batch_size` must be at least 1, not 0"),
    (lambda: EncodeConfig(workers=-1), "`workers` must be at least 0, not -1"),
    (lambda: EncodeConfig(chunk_size=0), "`chunk_size` must be at least 1, not 0"),
    (lambda: EncodeConfig(dtype="float64"), "`dtype` must be one of float16, float32, not 'float64'"),
    (lambda: EncodeConfig(decode_on="gpu"), "`decode_on` must be one of workers, device, not 'gpu'"),
    (lambda: EncodeConfig(device="tpu"), "unknown device 'tpu'"),
    (lambda: ExportConfig(format="csv"), "unknown `format=csv`"),
    (lambda: ExportConfig(shard_size=0), "`shard_size` must be at least 1, not 0"),
    (lambda: ExportConfig(seed=-1), "`seed` must be at least 0, not -1"),
    (lambda: dataclasses.replace(ExportConfig(), batch_size=0), "`batch_size` must be at least 1, not 0"),
])
def test_a_bad_value_is_refused_when_the_config_is_made_naming_the_parameter(make, said):
    with pytest.raises(UserError, match=re.escape(said)):
        make()


def test_the_command_line_shows_the_flag_where_the_config_names_the_parameter(inputs):
    result = CliRunner().invoke(app, ["encode", *inputs["encode"], "--decode-on", "gpu"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --decode-on must be one of workers, device, not 'gpu'"


def test_encode_with_a_config_writes_what_the_keywords_write(photo_folder, tiny_dc_vae_dir, tmp_path):
    options = {**SMALL, "dtype": "float32", "flip": True}
    encode_stage.encode(str(photo_folder), str(tmp_path / "keywords.zarr"), vae=str(tiny_dc_vae_dir), **options)
    encode_stage.encode(str(photo_folder), str(tmp_path / "config.zarr"), vae=str(tiny_dc_vae_dir),
                        config=EncodeConfig(**options))
    by_keywords, by_config = (LatentStore.open(str(tmp_path / name)) for name in ("keywords.zarr", "config.zarr"))
    assert by_config.attrs == by_keywords.attrs and by_config.attrs["encoder"]["batch_size"] == SMALL["batch_size"]
    np.testing.assert_array_equal(by_config.latents[:], by_keywords.latents[:])
    np.testing.assert_array_equal(by_config.latents_flip[:], by_keywords.latents_flip[:])


def test_export_with_a_config_writes_what_the_keywords_write(tmp_path):
    store = latent_store(tmp_path / "latents.zarr")
    shape = tuple(store.latent_shape)
    model = ReVQ(ReVQConfig(latent_shape=shape, tokens=int(np.prod(shape)) // 4, codes=16, dim=4, rectifier="none",
                            vae=VAE_ID))
    model.preprocessor.set_stats(*store.require_stats())
    model.save_pretrained(tmp_path / "run")
    options = dict(format="wds", shard_size=5, shuffle=True, seed=2, batch_size=3, device="cpu", progress=False)
    export_stage.export_tokens(str(tmp_path / "run"), store.url, str(tmp_path / "keywords"), **options)
    export_stage.export_tokens(str(tmp_path / "run"), store.url, str(tmp_path / "config"),
                               config=ExportConfig(**options))
    shards = sorted(path.name for path in (tmp_path / "keywords").glob("*.tar"))
    assert len(shards) > 1 and shards == sorted(path.name for path in (tmp_path / "config").glob("*.tar"))
    for name in shards:
        assert (tmp_path / "keywords" / name).read_bytes() == (tmp_path / "config" / name).read_bytes()
