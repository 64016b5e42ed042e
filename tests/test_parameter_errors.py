"""ParameterError: the layers below app/ name their own parameters; app/ renames them to the config keys users typed."""

import pickle

import pytest

from ddpm_schedules.app.keys import config_keys
from ddpm_schedules.costs.grids import candidate_grid
from ddpm_schedules.costs.refine import RefineSettings, check_refine
from ddpm_schedules.storage.errors import ParameterError, check_count, parameter_names


def test_fields_are_values_or_parameter_names():
    e = ParameterError("{grid} = {value!r}; use a coarser {grid} ({need:.1f} GB)", value={"a": [1]}, need=2.25)
    assert str(e) == "grid = {'a': [1]}; use a coarser grid (2.2 GB)"  # braces in a value are text
    assert isinstance(e, ValueError) and str(pickle.loads(pickle.dumps(e))) == str(e)


def test_renaming_nests_innermost_first_and_a_prefix_names_a_node():
    with pytest.raises(ValueError, match=r"^cost\.ode\.grid = 0; .* and cost\.ode\.memory_gb$"):
        with parameter_names(grid="cost.grid", memory_gb="cost.ode.memory_gb"):
            with parameter_names(grid="cost.ode.grid"):
                raise ParameterError("{grid} = {value}; a stride and {memory_gb}", value=0)
    with pytest.raises(ValueError, match="^data.batch_size = 0; it must be a positive integer$"):
        with config_keys("data"):
            check_count(0, "batch_size")
    with pytest.raises(ValueError, match="^cost.examples = 0; it must be a positive integer$"):
        with config_keys("cost.refine", examples="cost.examples"):
            check_count(0, "examples")


def test_a_decorated_function_renames_on_every_call():
    @config_keys(grid="callbacks.schedule_monitor.grid")
    def monitor_grid(spec):
        return candidate_grid(spec, 20)

    for _ in range(2):
        with pytest.raises(ValueError, match="^callbacks.schedule_monitor.grid = 'log:0'; use null"):
            monitor_grid("log:0")
    assert monitor_grid(5) == [5, 10, 15, 20]


def test_a_library_caller_sees_the_function_parameters_and_evaluate_the_keys():
    with pytest.raises(ValueError, match="^coarse = 0; an integer grid is a stride"):  # RefineSettings' own field
        check_refine(RefineSettings(coarse=0), 50, 4)
    with pytest.raises(ValueError, match="^cost.refine.coarse = 0; an integer grid is a stride"):
        with config_keys("cost.refine"):
            check_refine(RefineSettings(coarse=0), 50, 4)
    with pytest.raises(ValueError, match="^cost.refine.window = -1;"):
        with config_keys("cost.refine"):
            check_refine(RefineSettings(window=-1), 50, 4)


def test_plain_value_errors_pass_unchanged():
    with pytest.raises(ValueError, match="^grid values must lie in 1..5"):
        with config_keys(grid="cost.grid"):
            raise ValueError("grid values must lie in 1..5")
