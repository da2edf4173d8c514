#include "common/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, RendersPrometheusText) {
  Metrics m;
  m.GetCounter("x_total", "things")->Add(3);
  m.GetGauge("y_bytes", "bytes")->Set(7);
  Histogram* h = m.GetHistogram("z_seconds", "latency", {0.1, 1.0});
  h->Observe(0.05);
  h->Observe(0.5);
  h->Observe(5);
  const std::string text = m.RenderPrometheus();
  EXPECT_THAT(text, HasSubstr("# TYPE x_total counter\nx_total 3\n"));
  EXPECT_THAT(text, HasSubstr("y_bytes 7\n"));
  EXPECT_THAT(text, HasSubstr("z_seconds_bucket{le=\"0.1\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("z_seconds_bucket{le=\"1\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("z_seconds_bucket{le=\"+Inf\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("z_seconds_count 3\n"));
  EXPECT_EQ(m.GetCounter("x_total", "things")->value(), 3);
}

TEST(MetricsTest, GaugeReaderIsReadWhenRendered) {
  Metrics m;
  int64_t events = 2;
  m.SetGaugeReader("w_events", "events kept elsewhere", [&events] { return static_cast<double>(events); });
  EXPECT_THAT(m.RenderPrometheus(), HasSubstr("# TYPE w_events gauge\nw_events 2\n"));
  events = 5;
  EXPECT_THAT(m.RenderPrometheus(), HasSubstr("w_events 5\n"));
  m.SetGaugeReader("w_events", "events kept elsewhere", [] { return 9.0; });  // replaces
  const std::string text = m.RenderPrometheus();
  EXPECT_THAT(text, HasSubstr("w_events 9\n"));
  EXPECT_THAT(text, ::testing::Not(HasSubstr("w_events 5\n")));
}

}  // namespace
}  // namespace kvrecall
