import Foundation
import GranaryEngine
import GranaryMemory
@testable import GranaryMembership
import Synchronization
import Testing

/// What the configuration manager makes of a member's lease counter, round by round
/// (`ConfigurationManager.LeaseWatch`), and the verbs lease readers that feed it. The cases are the
/// false suspicions seen over soft-RoCE, where a client that rejoined was removed again at once.
@Suite("Lease watch: renewals and silence as the CM sees them")
struct LeaseWatchTests {
    static let ms: UInt64 = 1_000_000
    let node = NodeID(3)

    /// A lease of 200 ms, suspicion at the first expiry (as in the soft-RoCE tests).
    func watch() -> ConfigurationManager.LeaseWatch { ConfigurationManager.LeaseWatch(lease: 200 * Self.ms, expiry: 200 * Self.ms) }

    @Test("a counter unreadable at the first look, then read frozen (a former incarnation's page): no renewal, and silence only after the grace period")
    func unreadableFirstLookIsNoValue() {
        var watch = watch()
        let start: UInt64 = 1_000 * Self.ms
        var verdicts: [(UInt64, ConfigurationManager.LeaseWatch.Verdict)] = []
        verdicts.append((0, watch.observe(node, counter: nil, now: start, stalled: false, evidence: nil)))
        var suspectedAt: UInt64?
        for round in 1...60 {
            let now = start + UInt64(round) * 40 * Self.ms
            let verdict = watch.observe(node, counter: 485, now: now, stalled: false, evidence: nil)
            verdicts.append((now - start, verdict))
            #expect(!verdict.renewed, "round \(round): the frozen value 485 read after an unreadable look was taken for a renewal; verdicts \(verdicts)")
            if verdict.silentFor != nil, suspectedAt == nil { suspectedAt = now - start }
        }
        // Never seen renewing: the grace period (2 s), not the 200 ms expiry.
        #expect(suspectedAt.map { $0 > 2_000 * Self.ms } == true,
                "suspected \(suspectedAt.map { "\($0 / Self.ms) ms" } ?? "never") after the first look; the grace period is 2000 ms; verdicts \(verdicts)")
    }

    @Test("a member seen renewing is suspected after its expiry once a read begun after it proves the silence; a read under way, or a reader that has not run, proves nothing before two expiries")
    func silenceNeedsEvidence() {
        typealias Evidence = LeaseCounterReaders.Evidence
        var watch = watch()
        var now: UInt64 = 1_000 * Self.ms
        _ = watch.observe(node, counter: 1, now: now, stalled: false, evidence: Evidence(completedReadStart: now - Self.ms))
        for value in 2...5 as ClosedRange<UInt64> {
            now += 40 * Self.ms
            let verdict = watch.observe(node, counter: value, now: now, stalled: false, evidence: Evidence(completedReadStart: now - Self.ms))
            #expect(verdict.renewed, "the counter moved to \(value): \(verdict)")
        }
        let lastRenewal = now
        let silent = lastRenewal + 216 * Self.ms
        // A read under way for 175 ms (begun 41 ms after the last renewal); the latest to
        // complete began before it.
        let reading = lastRenewal + 41 * Self.ms
        var slowRead = watch
        let during = slowRead.observe(node, counter: nil, now: silent, stalled: false,
                                      evidence: Evidence(completedReadStart: lastRenewal + 1 * Self.ms, readUnderWaySince: reading))
        #expect(during.silentFor == nil, "suspected while a read begun 175 ms ago was under way: \(during)")
        #expect(during.renewing, "taken for quiet on no evidence: \(during)")
        // A reader that has not run for 244 ms (no read under way; the last began with the renewal).
        var starved = watch
        let notRun = starved.observe(node, counter: 5, now: silent + 28 * Self.ms, stalled: false,
                                     evidence: Evidence(completedReadStart: lastRenewal, readUnderWaySince: nil))
        #expect(notRun.silentFor == nil, "suspected on reads that all began before its lease ran out: \(notRun)")
        // Reads that answer: the one begun 210 ms after the renewal found the counter unchanged.
        var answered = watch
        let proven = answered.observe(node, counter: 5, now: silent, stalled: false,
                                      evidence: Evidence(completedReadStart: lastRenewal + 210 * Self.ms, readUnderWaySince: nil))
        #expect(proven.silentFor == 216 * Self.ms, "a counter read unchanged 210 ms after the renewal: \(proven)")
        #expect(!proven.renewing, "216 ms without a renewal, proven, is more than a lease: \(proven)")
        // A read under way for two expiries (a dead host): suspected.
        let stuck = slowRead.observe(node, counter: nil, now: reading + 400 * Self.ms, stalled: false,
                                     evidence: Evidence(completedReadStart: lastRenewal + 1 * Self.ms, readUnderWaySince: reading))
        #expect(stuck.silentFor != nil, "a read under way for 400 ms (two expiries) holds back the suspicion no longer: \(stuck)")
    }

    @Test("a stalled lease thread restarts the member's clock instead of blaming it")
    func stalledThreadRestartsClock() {
        var watch = watch()
        let start: UInt64 = 1_000 * Self.ms
        _ = watch.observe(node, counter: 1, now: start, stalled: false, evidence: nil)
        _ = watch.observe(node, counter: 2, now: start + 40 * Self.ms, stalled: false, evidence: nil)
        let stalled = watch.observe(node, counter: 2, now: start + 500 * Self.ms, stalled: true, evidence: nil)
        #expect(stalled.silentFor == nil)
        let after = watch.observe(node, counter: 2, now: start + 600 * Self.ms, stalled: false, evidence: nil)
        #expect(after.silentFor == nil, "100 ms after the stall: \(after)")
        let later = watch.observe(node, counter: 2, now: start + 720 * Self.ms, stalled: false, evidence: nil)
        #expect(later.silentFor == 220 * Self.ms, "220 ms after the stall: \(later)")
    }

    @Test("a lease reader forgets a node: a read begun before publishes nothing, and the reader reports a read under way")
    func readerForgets() async throws {
        // The first read blocks until released and returns the former incarnation's 485; every
        // later one returns the new incarnation's counter, 14.
        let release = DispatchSemaphore(value: 0)
        let calls = Calls()
        let readers = LeaseCounterReaders(interval: 300 * Self.ms, staleAfter: 10_000 * Self.ms) { _ in
            if calls.count.add(1, ordering: .relaxed).oldValue == 0 {
                release.wait()
                return 485
            }
            return 14
        }
        defer { readers.stop() }
        #expect(readers.counter(of: node) == nil, "nothing read yet")
        var waited = 0
        while readers.evidence(of: node).readUnderWaySince == nil, waited < 5_000 {
            try await Task.sleep(for: .milliseconds(1))
            waited += 1
        }
        let account = try #require(readers.account(of: node))
        #expect(account.description.contains("a read under way"), "\(account)")
        readers.forget(node)
        release.signal()
        var seen: [UInt64?] = []
        for _ in 0..<2_000 {
            let value = readers.counter(of: node)
            if seen.last != value { seen.append(value) }
            if value == 14 { break }
            try await Task.sleep(for: .milliseconds(1))
        }
        #expect(!seen.contains(485), "the value read under the former epoch was published: \(seen)")
        #expect(seen.last == 14, "the new counter was never published: \(seen)")
    }

    @Test("a lease reader reports its latest read failed (a probe's unanswered member) until a read answers")
    func readerReportsFailure() async throws {
        // Reads fail until the fifth, then answer.
        let calls = Calls()
        let readers = LeaseCounterReaders(interval: 1 * Self.ms, staleAfter: 10_000 * Self.ms) { _ in
            calls.count.add(1, ordering: .relaxed).oldValue < 4 ? nil : 7
        }
        defer { readers.stop() }
        _ = readers.counter(of: node)
        var states: [Bool] = []
        for _ in 0..<2_000 {
            let evidence = readers.evidence(of: node)
            if evidence.completedReadStart != 0, states.last != evidence.latestFailed { states.append(evidence.latestFailed) }
            if states == [true, false] { break }
            try await Task.sleep(for: .milliseconds(1))
        }
        #expect(states == [true, false], "latestFailed as the reads failed, then answered: \(states)")
        #expect(readers.counter(of: node) == 7)
    }
}

private final class Calls: Sendable {
    let count = Atomic<Int>(0)
}
