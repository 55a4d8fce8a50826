"""Flower adapters: the ResIST and FedAvg strategies, node sampling, reply screening, metering."""
