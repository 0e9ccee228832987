# OptiInfra Orchestrator image: CPython 3.11 and the service, nothing else (no shell,
# no package manager, no pip), under 50 MB, run as a non-root user and fit for a
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
# libsqlite3 is the embedded store's; libssl3 stays although the service serves no
# TLS, because prometheus_client imports ssl. The builder itself gets pip (its python3
# is the very same 3.11 build) to install the service into that root. Security and
# point updates are added to the sources, which debootstrap left at bookworm alone.
WORKDIR /tmp/debs
# hadolint ignore=DL3008
RUN printf 'deb http://deb.debian.org/debian %s main\n' bookworm-updates \
        >>/etc/apt/sources.list \
    && printf 'deb http://deb.debian.org/debian-security %s main\n' bookworm-security \
        >>/etc/apt/sources.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3-pip \
    && chown _apt . \
    && apt-get download libc6 libgcc-s1 zlib1g libexpat1 libffi8 libssl3 libsqlite3-0 \
        media-types python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
    && for deb in ./*.deb; do dpkg-deb -x "$deb" /rootfs; done \
    && rm -rf /var/lib/apt/lists/* /tmp/debs

# Trim the runtime root: documentation, locales, iconv modules (Python has its own
# codecs), libraries nothing links (libmvec, libexpatw), the parts of the standard
# library a server never imports, and the extension modules whose libraries were left
# out (bz2, lzma, curses, dbm, readline, ...): they could not load anyway, and the
# loader itself says which.
WORKDIR /rootfs
# Brace expansion is fine: SHELL is bash (hadolint forgets it after one instruction).
# hadolint ignore=SC3009
RUN rm -rf usr/share/doc usr/share/man usr/share/locale usr/share/lintian \
        usr/share/gcc usr/share/gdb usr/lib/x86_64-linux-gnu/gconv \
        lib/x86_64-linux-gnu/libmvec.so.1 usr/lib/x86_64-linux-gnu/libexpatw.so* \
    && rm -rf usr/lib/python3.11/{test,idlelib,tkinter,turtledemo,turtle.py,ensurepip} \
        usr/lib/python3.11/{lib2to3,pydoc_data,pydoc.py,doctest.py,unittest,curses,dbm} \
        usr/lib/python3.11/config-3.11-x86_64-linux-gnu \
        usr/lib/python3.11/lib-dynload/{_test,_ctypes_test,xx}*.so \
    && for so in usr/lib/python3.11/lib-dynload/*.so; do \
        chroot /rootfs /lib64/ld-linux-x86-64.so.2 --list "/$so" >/dev/null 2>&1 \
            || rm "$so"; \
    done \
    && ln -s python3.11 usr/bin/python3 \
    && mkdir -p -m 1777 tmp \
    && mkdir -p app etc && install -d -m 0700 -o 10001 -g 10001 var/lib/optiinfra \
    && printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
        'optiinfra:x:10001:10001:OptiInfra Orchestrator:/nonexistent:/usr/sbin/nologin' \
        >etc/passwd \
    && printf '%s\n' 'root:x:0:' 'optiinfra:x:10001:' >etc/group

# `pip install .`, resolving from the host's wheels only. Of the console scripts only
# twistd is kept.
COPY wheels/ /wheels/
COPY setup.py pyproject.toml README.md /src/
COPY optiinfra/ /src/optiinfra/
COPY twisted/ /src/twisted/
ARG SITE=/rootfs/usr/local/lib/python3.11/dist-packages
RUN python3 -m pip install --no-cache-dir --no-compile --find-links /wheels \
        --target "$SITE" /src \
    && mkdir -p /rootfs/usr/local/bin && mv "$SITE/bin/twistd" /rootfs/usr/local/bin/ \
    && rm -rf "${SITE:?}/bin"

# Prune what the service never imports:
#  - the TLS stack (cryptography, pyOpenSSL, cffi, service_identity, 16 MB): it only
#    comes in because treq asks for Twisted[tls]; the service speaks plain HTTP (an
#    HTTPS client call through treq would need it back, and would not fit in 50 MB);
#  - packaging (incremental's release tool wants it), test suites, C sources, stubs;
#  - Twisted's subsystems and protocols for other services, with their twistd
#    plugins. twisted.spread stays: twisted.web imports it.
WORKDIR $SITE
# hadolint ignore=SC3009
RUN rm -rf cryptography* OpenSSL pyOpenSSL* pyopenssl* cffi* _cffi_backend* pycparser* \
        service_identity* packaging packaging-* \
    && find . -depth -type d \( -name test -o -name tests -o -name _test \
        -o -name __pycache__ \) -exec rm -rf {} + \
    && find . -type f \( -name '*.c' -o -name '*.h' -o -name '*.pyi' \) -delete \
    && rm -rf twisted/{conch,mail,words,names,pair,positioning,trial,runner,enterprise} \
        twisted/{tap,internet/iocpreactor,newsfragments} \
        twisted/protocols/{ftp,sip,memcache,ident,pcp,postfix,shoutcast,finger}.py \
        twisted/protocols/{wire,htb,socks,portforward}.py \
        twisted/plugins/twisted_{conch,mail,names,words,trial,runner,inet}.py \
        twisted/plugins/{twisted_ftp,twisted_socks,twisted_portforward,cred_sshkeys}.py

# Smoke-test the result with its own interpreter, then write Twisted's plugin cache:
# at run time site-packages is read-only and owned by root, so twistd could not.
RUN chroot /rootfs python3 -c "import optiinfra.tap, klein, treq, structlog, orjson, \
prometheus_client, dotenv, werkzeug, twisted.web.server, twisted.scripts.twistd" \
    && chroot /rootfs python3 -c "from twisted.plugin import IPlugin, getPlugins; \
assert 'optiinfra' in [getattr(p, 'tapname', '') for p in getPlugins(IPlugin)]"


FROM scratch
COPY --from=build /rootfs/ /
# Nothing is written at run time but the store: no bytecode (the root may be
# read-only; bytecode for all that start-up imports would be 9.5 MB more for a start
# 0.7 s faster), no pidfile.
ENV PATH=/usr/local/bin:/usr/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DRAIN_TIMEOUT=8 \
    STATE_DIR=/var/lib/optiinfra
# The embedded SQLite store (unused when DATABASE_URL names PostgreSQL): a volume, so
# that it stays writable on a read-only root. Twisted spools request bodies over
# 100 kB to a temporary file: a read-only container accepting those needs
# `--tmpfs /tmp` as well.
VOLUME ["/var/lib/optiinfra"]
# A .env file mounted here is read as configuration (the real environment wins).
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# No shell in the image, so the check is exec form: a bare socket, as http.client
# would cost 0.25 s of compiling at every check (there is no bytecode) and would obey
# any HTTP_PROXY given to the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import socket, sys; s = socket.create_connection(('127.0.0.1', 8080), 2); s.sendall(b'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n'); r = s.makefile('rb').read(); sys.exit(r.split(b' ', 2)[1:2] != [b'200'] or b'\"status\":\"healthy\"' not in r)"]
# --pidfile=: no pidfile to write on a read-only root, nor a stale one to trip on.
# DRAIN_TIMEOUT (above) stays below `docker stop`'s 10 s grace. Options given after
# the image name replace CMD; the health check expects port 8080.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "optiinfra"]
CMD ["--port", "8080"]
