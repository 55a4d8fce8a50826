"""Test harnesses, not part of the library's API: the in-process Grid that drives a real
``Strategy.start`` against a real ClientApp without Flower's engine (it uses private
``flwr.supercore`` APIs, so it may break with a Flower release), and the per-sample torchvision
loader the device-resident batches are checked against."""
