"""Kernel tests run twice: here (CPU default path = torch reference) and, for tests marked `interpreter`, in a
subprocess with TRITON_INTERPRET=1 where the Triton kernels really run (see test_interpreter.py)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: runs the Triton kernels; needs TRITON_INTERPRET=1 (run by test_interpreter.py) or CUDA"
    )
