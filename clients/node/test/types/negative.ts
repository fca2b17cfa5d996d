// Must NOT compile: proves the conformance check has teeth. A storage whose loadSession answers
// the wrong type is refused by the installed SessionStorage interface (test/types.test.js
// expects exactly this file's marked line to fail).
import type { SessionStorage } from '@shopify/shopify-app-session-storage';
import { TokenwalSessionStorage } from '../../src/index';

class Broken extends TokenwalSessionStorage {
  // @ts-ignore -- the override itself is allowed here; the assignment below is the check.
  override async loadSession(id: string): Promise<string> {
    return id;
  }
}
export const refused: SessionStorage = new Broken(); // EXPECT-ERROR
