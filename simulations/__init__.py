"""Experiments: isolated ``flwr run`` launches, presets, the ResIST-vs-FedAvg runner and reports."""
