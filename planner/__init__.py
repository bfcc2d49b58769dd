"""Offline planner: device and model profiles, predictors, cost model and solver, deploy writer. The
runtime (engine/, kernels/) never imports it."""
