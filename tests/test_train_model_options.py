"""Step 3 trains every kind of MoE layer the model offers: expert choice, capacity dropping with SwiGLU
top-2, and the dense baseline (n_experts: 1), and records what the layer reports."""

import pytest

from helpers import check_ok, prepare_tiny_data, run_step_in_process, step_config_args

VARIANTS = {
    "expert_choice": {"model.router_type": "expert_choice"},
    "capacity_swiglu_top2": {"model.capacity_factor": 0.5, "model.expert_type": "swiglu", "model.top_k_experts": 2},
    "dense_baseline": {"model.n_experts": 1, "model.top_k_experts": 1},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("variants")
    return tmp_path, prepare_tiny_data(tmp_path, **{"train.max_steps": 3})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_runs_and_saves_the_model(data, variant):
    tmp_path, options = data
    model_options = [arg for key, value in VARIANTS[variant].items() for arg in ("--set", f"{key}={value}")]
    check_ok(run_step_in_process(3, *step_config_args(3), *options, *model_options, "--tag", variant, cwd=tmp_path))
    assert (tmp_path / "runs" / variant / "model" / "model.safetensors").is_file()
    if variant == "capacity_swiglu_top2":  # half the capacity: the layer must report dropped assignments
        from aim import Repo

        run = next(run for run in Repo(str(tmp_path)).iter_runs() if variant in run.tags)
        dropped = [
            value
            for metric in run.metrics()
            if metric.name == "dropped_fraction"
            for value in metric.values.values_list()
        ]
        assert dropped and min(dropped) > 0.0
