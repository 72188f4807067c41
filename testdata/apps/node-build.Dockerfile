# What a person would write by hand for node-build: every dependency for the build script,
# then only the production ones on the slim image.
FROM docker.io/library/node:22 AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm run build && npm prune --omit=dev

FROM docker.io/library/node:22-slim
ENV NODE_ENV=production PORT=8080
WORKDIR /app
COPY --from=build /app /app
USER 1000:1000
CMD ["node", "dist/server.js"]
