// The official OpenAI JavaScript SDK against the relay: a background response streamed, the connection
// dropped mid-stream, the stream resumed with `starting_after`, then polled. Prints one JSON line.
// Run by tests/test_openai_js.py with RELAY_URL, RELAY_KEY and UPSTREAM_KEY set.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.RELAY_URL + "/v1",
  apiKey: process.env.RELAY_KEY,
  defaultHeaders: { "X-OpenAI-API-Key": process.env.UPSTREAM_KEY },
  maxRetries: 0,
});
const input = process.env.INPUT;

const stream = await client.responses.create({
  model: "echo:pace=0.03",
  input,
  background: true,
  stream: true,
});
let id;
let last = -1;
let before = "";
let deltas = 0;
const seen = [];
for await (const event of stream) {
  seen.push(event.sequence_number);
  if (event.type === "response.created") id = event.response.id;
  if (event.type === "response.output_text.delta") {
    before += event.delta;
    deltas += 1;
  }
  last = event.sequence_number;
  if (deltas === 6) break; // leaving the loop aborts the request: the connection goes away
}

const resumed = await client.responses.retrieve(id, { stream: true, starting_after: last });
let after = "";
let finalText = null;
for await (const event of resumed) {
  seen.push(event.sequence_number);
  if (event.type === "response.output_text.delta") after += event.delta;
  if (event.type === "response.completed") finalText = event.response.output_text ?? null;
}

const polled = await client.responses.retrieve(id);
let notFound = false;
try {
  await client.responses.retrieve("resp_not_a_response");
} catch (err) {
  notFound = err instanceof OpenAI.NotFoundError;
}
console.log(JSON.stringify({ id, last, seen, text: before + after, polled: polled.output_text, status: polled.status, finalText, notFound }));
