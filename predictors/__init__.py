"""Predictors: guess which experts the next layers will route to."""
