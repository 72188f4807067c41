# What a person would write by hand for node-express: dependencies installed in the full
# image, the app run on the slim one. The buildpacks image must stay within 1.15x its size.
FROM docker.io/library/node:22 AS build
WORKDIR /app
COPY package.json ./
RUN npm install --omit=dev --no-audit --no-fund
COPY . .

FROM docker.io/library/node:22-slim
ENV NODE_ENV=production PORT=8080
WORKDIR /app
COPY --from=build /app /app
USER 1000:1000
CMD ["node", "server.js"]
