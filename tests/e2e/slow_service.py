"""The noisewise service with every forward pass slowed by ``NOISEWISE_TEST_PASS_DELAY_MS``: a stand-in for a
bigger network in the real-server batching test (``bentoml serve tests.e2e.slow_service:Noisewise``)."""

import os
import time

from noisewise.services import service

_load_served = service.load_served


def _slow_load_served(settings):
    served = _load_served(settings)
    forward, delay = served.forward, float(os.environ.get("NOISEWISE_TEST_PASS_DELAY_MS", "0")) / 1000

    def slow_forward(x):
        time.sleep(delay)
        return forward(x)

    served.forward = slow_forward
    return served


service.load_served = _slow_load_served
Noisewise = service.Noisewise
