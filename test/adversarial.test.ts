// The adversarial layer (issue 13) in `npm test`: a fixed set of seeds, each one run of generated
// hostile clients, reloads and a shutdown against a real `smartproxy serve` process, with the
// invariants of test/support/adversary.ts checked during and after the run. A failing seed prints
// what broke, the daemon's last log lines and the plan; `npm run fuzz -- --seed N --count 1`
// replays it, and `npm run fuzz -- --seed N --minutes M` explores further seeds locally.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { describePlan, formatFailure, generatePlan, planToJson, runPlan } from './support/adversary.ts';

/**
 * Chosen for what their plans cover together: queue floods refused in a row, back-to-back and
 * invalid reloads, binds moved between listeners, PROXY listeners, route limits, SIGTERM with
 * connections open and SIGHUP followed at once by SIGTERM. Each also drives the pool routes
 * (issue 17): every balance mode, checks, ejection, backends dying, drain and maintenance through
 * the admin API. About 7 s each.
 */
const SEEDS = [11, 13, 15, 24, 37];

test('the same seed always gives the same plan, and a plan survives its JSON form', () => {
  for (const seed of [1, 2, 3]) {
    const plan = generatePlan(seed);
    assert.deepEqual(generatePlan(seed), plan);
    assert.deepEqual(JSON.parse(planToJson(plan)), JSON.parse(JSON.stringify(plan)));
  }
  assert.notDeepEqual(generatePlan(1).steps, generatePlan(2).steps);
});

for (const seed of SEEDS) {
  const plan = generatePlan(seed);
  test(`seed ${seed}: ${describePlan(plan)} leave the daemon running, within its deadlines and back at zero`, { timeout: 45_000 }, async (t) => {
    const result = await runPlan(t, plan);
    t.diagnostic(`seed ${seed} in ${result.durationMs} ms: ${result.summary}`);
    if (result.failures.length > 0) assert.fail(formatFailure(plan, result));
  });
}
