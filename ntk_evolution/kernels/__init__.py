"""Kernels: the empirical NTK and its memory plan (ntk), kernel regression and the closed-form
ReLU NTK (regression), kernel predictors chosen by flags and attacked (predictors), NTK
eigen-features (features), kernel evolution measures (analysis)."""
