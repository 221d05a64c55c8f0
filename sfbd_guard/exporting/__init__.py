"""`guard export`: a trained run's model as a folder other tools load (diffusers' layout, or our network with its
loader), with its model card, licence and evidence, and only the files of an allow-list (exporting/layout.py)."""
