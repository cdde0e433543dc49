"""The `avatar-render` console script (cli/main.py), one module per subcommand (cli/commands/).

It sits on top of every other package: `run` drives pipeline + actors, `serve` and `submit` the service in
deploy/, `render-one`, `eval`, `synth` and `model-info` the model. Nothing imports it.
"""
