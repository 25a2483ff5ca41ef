"""Side by side with peer servers (issue 6): the same model behind this project and behind other servers.

Modules: ``adapters`` (each server's request body and response parsing), ``servers`` (what each
installs, how it starts, its settings, process lifecycle), ``venvs`` (a venv per peer outside the
project), ``run`` (the round-robin measurement), ``compare`` (saturation and the two targets),
``output`` (JSON, markdown, PNG). ``serve_triton.py``, ``serve_ray.py`` and ``torchserve_handler.py``
run inside the peers' own venvs and import nothing from the project.
"""
