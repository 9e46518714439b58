"""flows.yaml validation: every mistake is one line naming the file, the entry and the fix."""

import pytest
import yaml

from bitsweep.config import load_config, parse_config
from bitsweep.errors import BitsweepError


def sweep(**changes):
    base = {"name": "s", "models": ["resnet18"], "dataset": {"name": "synthetic"}, "schemes": ["pow2"],
            "bits": [8, 4]}
    return {"sweeps": [{**base, **changes}]}


@pytest.mark.parametrize("changes, message", [
    ({"bits": [8, 4, 9]}, "flows.yaml: sweeps[0].bits[2]: 9 is outside 2..8"),
    ({"bits": [8, "four"]}, "flows.yaml: sweeps[0].bits[1]: Input should be a valid integer"),
    ({"schemes": ["pow2", "int4"]}, "flows.yaml: sweeps[0].schemes[1]: unknown scheme 'int4'; available: asymmetric"),
    ({"compressors": ["rar"]}, "flows.yaml: sweeps[0].compressors[0]: unknown compressor 'rar'; available: 7z, gzip"),
    ({"dataset": {"name": "imagenet21k"}}, "flows.yaml: sweeps[0].dataset.name: unknown dataset 'imagenet21k'"),
    ({"granularity": ["row"]}, "flows.yaml: sweeps[0].granularity[0]: Input should be 'tensor', 'channel' or 'group'"),
    ({"granularity": ["group"]}, "flows.yaml: sweeps[0]: group_size is needed exactly when granularity lists 'group'"),
    ({"policies": [{"keep_frist": 1}]}, "flows.yaml: sweeps[0].policies[0].keep_frist: unknown key"),
    ({"policies": ["half"]}, "flows.yaml: sweeps[0].policies[0]: policy 'half' is not understood"),
    ({"policies": [{"allocate": True, "bits": {"fc": 8}}]},
     "flows.yaml: sweeps[0].policies[0]: allocate chooses every layer's width itself; drop either bits or allocate"),
    ({"bitz": [4]}, "flows.yaml: sweeps[0].bitz: unknown key"),
    ({"name": "has space"}, "flows.yaml: sweeps[0].name: String should match pattern"),
    ({"models": []}, "flows.yaml: sweeps[0].models: List should have at least 1 item"),
    ({"kernels": ["int8", "int8"]}, "flows.yaml: sweeps[0]: kernels lists int8 more than once"),
    ({"kernels": ["gpu"]}, "flows.yaml: sweeps[0].kernels[0]: Input should be 'weight-only' or 'int8'"),
    ({"recipes": ["none", "nope"]}, "flows.yaml: sweeps[0].recipes[1]: unknown recipe 'nope'; available: adaround, adaround-bias, bias"),
    ({"clustering": {"k": 0}}, "flows.yaml: sweeps[0].clustering.k: 0 is neither a positive number of super-classes "
                               "nor 'auto'"),
    ({"clustering": {"source": "labels"}}, "flows.yaml: sweeps[0].clustering.source: Input should be 'auto', "),
    ({"sensitivity": {"images": -1}}, "flows.yaml: sweeps[0].sensitivity.images: Input should be greater than or "),
    ({"synthetic": {"images": 0}}, "flows.yaml: sweeps[0].synthetic.images: Input should be greater than or equal "),
    ({"synthetic": {"image": 64}}, "flows.yaml: sweeps[0].synthetic.image: unknown key"),
    ({"sensitivity": {"images": 10, "schemes": ["int4"]}},
     "flows.yaml: sweeps[0].sensitivity.schemes[0]: unknown scheme 'int4'; available: asymmetric"),
])
def test_bad_entries_are_named(changes, message):
    with pytest.raises(BitsweepError) as error:
        parse_config(sweep(**changes))
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(BitsweepError, match="no such file; run from the project folder or pass --config"):
        load_config(tmp_path / "flows.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweeps:\n  - name: a\n    bits: [4, 8\n")
    with pytest.raises(BitsweepError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_config(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(BitsweepError, match="bad.yaml: top level"):
        load_config(bad)


def test_shorthands_and_defaults(tmp_path):
    path = tmp_path / "flows.yaml"
    config = sweep(models=["resnet18", {"source": "trained", "name": "resnet10t", "epochs": 2}],
                   policies=["full", {"keep_first": 1}, {"allocate": True, "keep_last": 1}])
    config["deployments"] = [{"name": "nightly", "sweep": "s", "cron": "0 3 * * *"}]
    path.write_text(yaml.safe_dump(config))
    parsed = load_config(path)
    s = parsed.sweeps[0]
    assert [m.source for m in s.models] == ["timm", "trained"] and s.models[1].options == {"epochs": 2}
    assert [p.label for p in s.policies] == ["full", "keep_first=1", "keep_last=1,allocate"]
    assert s.granularity == ["channel"] and s.compressors == ["gzip", "7z", "zstd"]
    assert str(s.run_dir) == "runs/s" and parsed.deployments[0].cron == "0 3 * * *"
    with pytest.raises(BitsweepError, match="no sweep named 'x'; flows.yaml has: s"):
        parsed.sweep("x")


def test_deployment_must_name_a_sweep():
    config = sweep()
    config["deployments"] = [{"name": "nightly", "sweep": "other", "cron": "0 3 * * *"}]
    with pytest.raises(BitsweepError, match="deployment 'nightly' names sweep 'other', which is not one of: s"):
        parse_config(config)
