"""The ResIST method on plain name -> array mappings: model, decomposition, merge, reply checks.

Nothing in this package imports Flower.
"""
