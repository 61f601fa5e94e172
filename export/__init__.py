"""fewstep.export: turns a diffusers folder or single-file checkpoint into a model package."""
