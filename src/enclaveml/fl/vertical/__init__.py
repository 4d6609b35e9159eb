"""Vertical federated learning: private set intersection, vertical boosted trees and logistic regression."""
