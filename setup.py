"""Maps the repository's top-level folders into the hf_accel namespace (see pyproject.toml)."""

from setuptools import find_packages, setup

ROOTS = {"hf_accel": "hf_accel", "hf_accel.plugins": "plugins", "hf_accel.kernels": "kernels", "hf_accel.model_cards": "model_cards"}

packages, package_dir = [], {}
for package, folder in ROOTS.items():
    package_dir[package] = folder
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=sorted(set(packages)), package_dir=package_dir)
