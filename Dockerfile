# syntax=docker/dockerfile:1
# One image per service, all from this file:
#   docker build --build-arg SERVICE=mta-outbound -t mailstack/mta-outbound .
# SERVICE is a folder under services/ (msa, mta-inbound, mta-outbound, mda, pop3, admin-api).
#
# Node 22 runs the TypeScript sources directly (type stripping), so there is no compile step.
# Node refuses to strip types from files under node_modules, which is why this does not use
# `pnpm deploy` (it copies the workspace packages into node_modules): the install below keeps
# the workspace layout, so @mailstack/* resolve through symlinks to /app/packages/*/src.

ARG NODE_IMAGE=node:22-slim

FROM ${NODE_IMAGE} AS build
ARG SERVICE
ARG PNPM_VERSION=10.34.9
RUN test -n "$SERVICE" || (echo "build with --build-arg SERVICE=<folder under services/>" >&2; exit 1)
RUN npm install --global --no-audit --no-fund pnpm@${PNPM_VERSION}
WORKDIR /app
COPY package.json pnpm-lock.yaml pnpm-workspace.yaml ./
# pnpm.patchedDependencies in package.json points here.
COPY patches/ patches/
COPY packages/ packages/
COPY services/${SERVICE}/ services/${SERVICE}/
# Production dependencies of this service and of the workspace packages it uses, nothing else.
RUN --mount=type=cache,id=pnpm-store,target=/root/.local/share/pnpm/store \
    pnpm install --frozen-lockfile --prod --filter "@mailstack/${SERVICE}..."

FROM ${NODE_IMAGE} AS runtime
ARG SERVICE
# tini as PID 1 forwards SIGTERM to node and reaps zombies; node handles SIGTERM itself
# (graceful shutdown in @mailstack/runtime).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/mailstack/tls \
 && chown -R node:node /var/lib/mailstack
# A smaller young generation and fewer malloc arenas keep each service's resident memory down;
# the same settings as scripts/stack.ts (checked by test/deploy/image.test.ts).
ENV NODE_ENV=production \
    SERVICE=${SERVICE} \
    TLS_DIR=/var/lib/mailstack/tls \
    NODE_OPTIONS=--max-semi-space-size=4 \
    MALLOC_ARENA_MAX=2
# Owned by root and read-only for the service user.
COPY --from=build /app /app
COPY deploy/docker/healthcheck.mjs /usr/local/lib/mailstack/healthcheck.mjs
WORKDIR /app/services/${SERVICE}
# The unprivileged user of the node image (uid 1000); ports below 1024 are mapped outside.
USER node
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["node", "/usr/local/lib/mailstack/healthcheck.mjs"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["node", "src/main.ts"]
