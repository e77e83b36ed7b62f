"""Training, data preparation and evaluation of the models this project ships (`editor train`, ...)."""
