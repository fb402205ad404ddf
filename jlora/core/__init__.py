"""The core: parameter paths and targets, the adapter protocol and registry, weight axes, the jaxpr
interpreter behind ``adapt``, merge, the frozen/trainable partition, the masked optimizer, parameter
counts, and stacks of adapters (one per example). It knows nothing of models, data or the CLI."""
