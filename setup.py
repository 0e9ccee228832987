"""Packaging for the OptiInfra Orchestrator."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (HERE / "optiinfra" / "__init__.py").read_text(),
    re.MULTILINE,
).group(1)

setup(
    name="optiinfra-orchestrator",
    version=VERSION,
    description="Control plane for OptiInfra's cost, performance, resource and "
    "application agents.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted.plugins is a namespace-style drop-in directory (no __init__.py, on
    # purpose: shipping one would shadow Twisted's own), so find_packages cannot
    # see it and it is listed by hand.
    packages=[*find_packages(include=["optiinfra", "optiinfra.*"]), "twisted.plugins"],
    package_data={
        "optiinfra": [
            "py.typed",
            "store/migrations/*/*.sql",
            "console/static/*.html",
            "console/static/*.js",
            "console/static/*.css",
        ]
    },
    exclude_package_data={"twisted.plugins": ["dropin.cache", "*.pyc"]},
    install_requires=[
        "Twisted>=24.7,<27",
        "klein>=24.8,<25",
        "Werkzeug>=3.0,<4",
        "treq>=24.9,<27",
        "structlog>=24.1,<27",
        "prometheus-client>=0.20,<1",
        "orjson>=3.10,<4",
        "attrs>=23.2,<27",
        "zope.interface>=6.0,<9",
        "python-dotenv>=1.0,<2",
        "psycopg[binary]>=3.2,<4",
    ],
    extras_require={
        "tls": ["Twisted[tls]>=24.7,<27"],
        "dev": [
            "Twisted[tls]>=24.7,<27",
            "pytest>=8.0,<10",
            "pytest-twisted>=1.14,<2",
            "pytest-cov>=5.0,<8",
            "coverage>=7.4,<8",
            "hypothesis>=6.100,<7",
            "ruff>=0.6,<0.18",
            "mypy>=1.11,<2.5",
            "mypy-zope>=1.0.17,<2",
            "import-linter>=2.16,<3",
            "playwright>=1.45,<2",
            "jsonschema>=4.23,<5",
            "referencing>=0.35,<1",
            "schemathesis>=4.32,<5",
        ],
    },
    entry_points={},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
    ],
)
