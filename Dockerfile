# OptiInfra Orchestrator image: CPython 3.11 and the service, nothing else (no shell,
# no package manager, no pip), about 30 MB, run as a non-root user and fit for a
# read-only root filesystem.
#
# Build it with deploy/docker/build.sh IMAGE:TAG (or `make docker-build`). That script
# first makes what this file cannot fetch, since no registry and no HTTPS to PyPI are
# reachable from inside a build:
#   - the builder base ${BUILDER_IMAGE}: Debian bookworm from debootstrap;
#   - wheels/: every dependency as a wheel, built on the host.
# The legacy builder runs this file: no `# syntax=` line, BuildKit would need a
# registry for its frontend.

ARG BUILDER_IMAGE=local/debian:bookworm-minbase

FROM ${BUILDER_IMAGE} AS build
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# The runtime root is assembled from Debian's own packages, extracted rather than
# installed: the interpreter and the few libraries it loads, no dpkg, no shell.
# The builder also gets pip (its python3 is the very same 3.11 build) to install the
# service into that root. Security and point updates are added to the sources,
# which debootstrap left at bookworm alone.
WORKDIR /tmp/debs
# hadolint ignore=DL3008
RUN printf 'deb http://deb.debian.org/debian %s main\n' bookworm-updates \
        >>/etc/apt/sources.list \
    && printf 'deb http://deb.debian.org/debian-security %s main\n' bookworm-security \
        >>/etc/apt/sources.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3-pip \
    && apt-get download libc6 libgcc-s1 zlib1g libexpat1 libffi8 libssl3 media-types \
        python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
    && for deb in ./*.deb; do dpkg-deb -x "$deb" /rootfs; done \
    && rm -rf /var/lib/apt/lists/* /tmp/debs

# Trim the runtime root: documentation, locales and iconv modules (Python has its own
# codecs), the parts of the standard library a server never imports, and the
# extension modules whose libraries are left out (sqlite3, bz2, lzma, curses, dbm,
# readline, ...): they could not load anyway. The loader itself says which.
# libssl3 stays although the service serves no TLS: prometheus_client imports ssl.
WORKDIR /rootfs
RUN rm -rf usr/share/doc usr/share/man usr/share/locale usr/share/lintian \
        usr/share/gcc usr/share/gdb usr/lib/x86_64-linux-gnu/gconv \
    && (cd usr/lib/python3.11 && rm -rf test idlelib tkinter turtledemo turtle.py \
        ensurepip lib2to3 pydoc_data sqlite3 curses dbm config-3.11-x86_64-linux-gnu \
        lib-dynload/_test*.so lib-dynload/_ctypes_test*.so lib-dynload/xx*.so) \
    && for so in usr/lib/python3.11/lib-dynload/*.so; do \
        chroot /rootfs /lib64/ld-linux-x86-64.so.2 --list "/$so" >/dev/null 2>&1 \
            || rm "$so"; \
    done \
    && ln -s python3.11 usr/bin/python3 \
    && mkdir -p -m 1777 tmp \
    && mkdir -p app etc \
    && printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
        'optiinfra:x:10001:10001:OptiInfra Orchestrator:/nonexistent:/usr/sbin/nologin' \
        >etc/passwd \
    && printf '%s\n' 'root:x:0:' 'optiinfra:x:10001:' >etc/group

# Dependencies first, so that a change to the service's code reuses this layer's
# inputs. pip resolves exactly as `pip install .` does, from the host's wheels only.
COPY wheels/ /wheels/
COPY setup.py pyproject.toml README.md /src/
COPY optiinfra/ /src/optiinfra/
COPY twisted/ /src/twisted/
ARG SITE=/rootfs/usr/local/lib/python3.11/dist-packages
RUN python3 -m pip install --no-compile --find-links /wheels --target "$SITE" /src \
    && mkdir -p /rootfs/usr/local/bin && mv "$SITE/bin/twistd" /rootfs/usr/local/bin/ \
    && rm -rf "$SITE/bin"

# Prune what the service never imports:
#  - the TLS stack (cryptography, pyOpenSSL, cffi, service_identity): it only comes
#    in because treq asks for Twisted[tls]; the service speaks plain HTTP;
#  - test suites, C sources and type stubs;
#  - Twisted's subsystems for other protocols, with their twistd plugins. twisted.spread
#    stays: twisted.web imports it.
WORKDIR $SITE
RUN rm -rf cryptography* OpenSSL pyOpenSSL* pyopenssl* cffi* _cffi_backend* pycparser* \
        service_identity* \
    && find . -depth -type d \( -name test -o -name tests -o -name __pycache__ \) \
        -exec rm -rf {} + \
    && find . -type f \( -name '*.c' -o -name '*.h' -o -name '*.pyi' \) -delete \
    && (cd twisted && rm -rf conch mail words names pair positioning trial runner \
        enterprise internet/iocpreactor \
        plugins/twisted_conch.py plugins/twisted_mail.py plugins/twisted_names.py \
        plugins/twisted_words.py plugins/twisted_trial.py plugins/twisted_runner.py \
        plugins/twisted_inet.py plugins/twisted_ftp.py plugins/twisted_socks.py \
        plugins/twisted_portforward.py plugins/cred_sshkeys.py)

# Smoke-test the result with its own interpreter, then write Twisted's plugin cache:
# at run time site-packages is read-only and owned by root, so twistd could not.
RUN chroot /rootfs python3 -c "import optiinfra.tap, klein, treq, structlog, orjson, \
prometheus_client, dotenv, werkzeug, twisted.web.server, twisted.scripts.twistd" \
    && chroot /rootfs python3 -c "from twisted.plugin import IPlugin, getPlugins; \
assert 'optiinfra' in [getattr(p, 'tapname', '') for p in getPlugins(IPlugin)]"


FROM scratch
COPY --from=build /rootfs/ /
# Bytecode is compiled in memory at start: .pyc files would be 20 MB more, and the
# root filesystem is read-only.
ENV PATH=/usr/local/bin:/usr/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DRAIN_TIMEOUT=8
# A .env file mounted here is read as configuration (the real environment wins).
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# No shell in the image, so the check is exec form. http.client rather than urllib:
# it ignores any HTTP(S)_PROXY set for the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import http.client as h, json, sys; c = h.HTTPConnection('127.0.0.1', 8080, timeout=2); c.request('GET', '/health'); r = c.getresponse(); sys.exit(r.status != 200 or json.load(r).get('status') != 'healthy')"]
# --pidfile=: no pidfile to write on a read-only root, nor a stale one to trip on.
# DRAIN_TIMEOUT (above) stays below `docker stop`'s 10 s grace. Extra options go
# after the image name and replace CMD; the health check expects port 8080.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "optiinfra"]
CMD ["--port", "8080"]
