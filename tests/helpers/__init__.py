"""Helpers shared by the tests (as Lightning's ``tests_pytorch/helpers``): builders, generated
fixtures and the reference computations the tests compare with."""
